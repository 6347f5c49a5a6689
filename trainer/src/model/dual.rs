//! What every dual-branch model holds beside its networks, and the accessors of the
//! [`DualDenoiser`](super::DualDenoiser) trait written once over it: the parameter store, the
//! parts it was built with, the LISA decoder and its configuration (hook resolved).

use std::path::Path;

use lisa_core::backend::{Backend, DType};

use super::{DECODER, DecoderConfig, HookLayer, LisaDecoder, MAIN, Parts, SIDE};
use crate::autodiff::Var;
use crate::error::{Result, TrainError};
use crate::params::{Bound, ParamStore};
use crate::weights::load_params;

/// The parameter store, parts and LISA decoder of a dual-branch model.
pub struct DualParts<B: Backend> {
    /// Every parameter, under [`MAIN`], [`SIDE`] and [`DECODER`].
    pub store: ParamStore<B>,
    /// The parts built.
    pub parts: Parts,
    /// The LISA decoder (LISA training only).
    pub decoder: Option<LisaDecoder>,
    /// Its configuration, with the hook resolved (the architecture's default when none was
    /// chosen), as the model's spec records it.
    pub decoder_config: DecoderConfig,
}

impl<B: Backend> DualParts<B> {
    /// An empty store for `parts` on `device`, seeded with `seed`: the main network frozen
    /// unless the prior alone is built (pretraining).
    pub fn new_store(device: B::Device, seed: u64, parts: Parts) -> ParamStore<B> {
        let store = ParamStore::new(device, seed);
        if parts == Parts::Prior { store } else { store.freeze_prefix(MAIN) }
    }

    /// The frozen main network in its storage type `dtype` (after the side network copied it
    /// in f32), and autocast in that type for every pass (the side network and the decoder
    /// keep f32 master weights, cast once per pass). f32: no autocast, nothing cast.
    pub fn cast_main(&mut self, dtype: DType) -> Result<()> {
        if dtype == DType::F32 {
            self.store.set_autocast(None);
            return Ok(());
        }
        let device = self.store.device().clone();
        if !B::supports_dtype(&device, dtype) {
            return Err(TrainError::Config(format!("this backend's device cannot store {dtype}")));
        }
        self.store.set_autocast(Some(dtype));
        let ids: Vec<_> = self.store.iter().filter(|(_, p)| p.name.starts_with(MAIN)).map(|(id, _)| id).collect();
        for id in ids {
            let v = B::cast(&self.store.get(id).value, dtype)?;
            self.store.get_mut(id).value = v;
        }
        Ok(())
    }

    /// The hook the LISA decoder reads (None: built without the decoder).
    pub fn lisa_hook(&self) -> Option<HookLayer> {
        self.decoder.as_ref().and(self.decoder_config.hook)
    }

    /// `D(h, t)`: the LISA decoder on the hooked feature.
    pub fn decode_lisa(&self, p: &Bound<'_, B>, feature: &Var<B>, t: &[f32]) -> Result<Var<B>> {
        let d = self.decoder.as_ref().ok_or_else(|| TrainError::Config("built without the LISA decoder".into()))?;
        d.forward(p, feature, t)
    }

    /// Loads trained side (and, when built, decoder) weights written by a training
    /// checkpoint; a checkpoint's decoder weights are skipped by a model without one.
    pub fn load_trained(&mut self, path: &Path) -> Result<usize> {
        let with_decoder = self.decoder.is_some();
        load_params(
            &mut self.store,
            path,
            |n| n.starts_with(SIDE) || (with_decoder && n.starts_with(DECODER)),
            |n| !with_decoder && n.starts_with(DECODER),
        )
    }
}
