//! A model copied onto another device: what each rank of a one-process multi-GPU run trains.
//! The copy is built from the model's spec and takes every parameter's value, so it is the
//! same model whatever was loaded into the original (a pipeline folder, a ControlNet, a
//! checkpoint).

use lisa_core::backend::{Backend, DType, Shape};

use crate::error::{Result, TrainError};
use crate::model::{DualDenoiser, registry};

/// Every parameter of a model, in host memory (plain data: it crosses threads).
pub struct HostWeights {
    tensors: Vec<(String, Vec<f32>, Shape, DType)>,
    autocast: Option<DType>,
}

impl HostWeights {
    /// The values of `model`'s parameters.
    pub fn of<B: Backend>(model: &dyn DualDenoiser<B>) -> Result<Self> {
        let store = model.store();
        let tensors = store
            .iter()
            .map(|(_, p)| Ok((p.name.clone(), B::to_vec(&p.value)?, B::shape(&p.value), B::dtype(&p.value))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { tensors, autocast: store.autocast() })
    }

    /// A model built like `original` (its spec and parts) on `device`, holding these values.
    pub fn replicate<B: Backend>(
        &self,
        spec: &crate::model::ModelSpec,
        parts: crate::model::Parts,
        seed: u64,
        device: B::Device,
    ) -> Result<Box<dyn DualDenoiser<B>>> {
        let mut model = registry::build::<B>(spec, parts, device.clone(), seed)?;
        let store = model.store_mut();
        if store.len() != self.tensors.len() {
            return Err(TrainError::Internal("a rebuilt model has other parameters than its original"));
        }
        for (name, values, shape, dtype) in &self.tensors {
            let id =
                store.find(name).ok_or(TrainError::Internal("a rebuilt model lacks a parameter of its original"))?;
            store.get_mut(id).value = B::from_slice(values, shape, *dtype, &device)?;
        }
        store.set_autocast(self.autocast);
        Ok(model)
    }
}
