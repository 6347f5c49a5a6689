//! What a training run from a diffusers pipeline folder starts with (SD 1.x/2.x and SD3 alike):
//! the model built and loaded, what validates it, and the lock on its cached inputs; the parts
//! a run trains, and what `--mixed-precision` does on the running backend.

use lisa_core::backend::Backend;
use lisa_trainer::model::sd::MixedPrecision;
use lisa_trainer::model::{DualDenoiser, Parts};
use lisa_trainer::train::Mode;

use crate::sd_validation::LatentValidationFiles;

/// A model built from a diffusers pipeline, ready to train, and what its run validates with.
pub struct SdStart<B: Backend> {
    /// The model, loaded, its inputs read.
    pub model: Box<dyn DualDenoiser<B>>,
    /// What validation samples.
    pub validation: Option<LatentValidationFiles>,
    /// The input cache's lock, held while the run reads it.
    pub cache_lock: Option<std::fs::File>,
}

/// The parts a run of `mode` trains: the LISA decoder only with LISA.
pub fn mode_parts(mode: Mode) -> Parts {
    Parts::Dual { decoder: mode == Mode::Lisa }
}

/// What `--mixed-precision` does on this backend and device.
pub fn mixed_precision_note<B: Backend>(precision: MixedPrecision, device: &B::Device) -> String {
    let dtype = precision.flag();
    let how = match B::half_products(device, precision.dtype()) {
        lisa_core::backend::HalfProducts::TensorCores => {
            format!("the {} backend runs {dtype} products on tensor cores with f32 accumulation", B::name())
        }
        lisa_core::backend::HalfProducts::F32Arithmetic => format!(
            "the {} backend has no {dtype} tensor cores here: it stores {dtype} and computes in f32 (half the activation memory, no speed-up)",
            B::name()
        ),
    };
    let scaling = if precision == MixedPrecision::Fp16 { "; the loss is scaled dynamically (GradScaler)" } else { "" };
    format!(
        "note: --mixed-precision {dtype}: the frozen UNet, VAE and text encoder are stored in {dtype}; \
         the UNet, ControlNet and LISA decoder autocast (matmuls, convolutions, norms and attention take {dtype} inputs; \
         the ControlNet and decoder keep f32 master weights){scaling}; {how}"
    )
}
