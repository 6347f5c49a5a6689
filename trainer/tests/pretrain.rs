//! Pretraining the main model: the loss falls, and the exported weights load into the
//! dual-branch model (whose side network then starts as their copy).

mod common;

use common::tiny_model;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::data::FillCircles;
use lisa_trainer::model::{Parts, registry};
use lisa_trainer::optim::OptimConfig;
use lisa_trainer::pretrain::{PretrainConfig, Pretrainer};

#[test]
fn pretraining_learns_and_exports_a_loadable_prior() {
    let cfg = tiny_model();
    let data = FillCircles { resolution: 16, len: 128, seed: 2 };
    let pc = PretrainConfig {
        batch_size: 8,
        max_train_steps: 40,
        optim: OptimConfig { lr: 3e-3, ..OptimConfig::default() },
        ema_decay: Some(0.9),
        ..PretrainConfig::default()
    };
    let mut p = Pretrainer::<C>::new(&cfg, pc, CpuDevice).unwrap();
    let losses: Vec<f32> = (0..40).map(|_| p.step(&data).unwrap().loss).collect();
    let (first, last) = (losses[..8].iter().sum::<f32>() / 8.0, losses[32..].iter().sum::<f32>() / 8.0);
    assert!(last < 0.7 * first, "pretraining loss {first} -> {last}");

    let dir = std::env::temp_dir().join(format!("lisa-pretrain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("main.safetensors");
    p.export(&path).unwrap();
    let mut model = registry::build::<C>(&cfg, Parts::Dual { decoder: true }, CpuDevice, 99).unwrap();
    let n = model.load_main(&path).unwrap();
    assert_eq!(n, p.model.store().len());
    // The exported values are the EMA weights, and the side copies them.
    let ema = p.optimizer.ema.as_ref().unwrap();
    for (id, shadow) in &ema.shadow {
        let name = &p.model.store().get(*id).name;
        let loaded = model.store().get(model.store().find(name).unwrap());
        assert_eq!(C::to_vec(&loaded.value).unwrap(), C::to_vec(shadow).unwrap(), "{name}");
        if name.starts_with("main.encoder.") {
            let side = model.store().get(model.store().find(&name.replacen("main.", "side.", 1)).unwrap());
            assert_eq!(C::to_vec(&side.value).unwrap(), C::to_vec(shadow).unwrap());
        }
    }
    // A prior of another shape is refused.
    let mut other = tiny_model();
    other.config["unet"]["channels"] = serde_json::json!([8, 8]);
    let mut wrong = registry::build::<C>(&other, Parts::Dual { decoder: false }, CpuDevice, 0).unwrap();
    let err = wrong.load_main(&path).unwrap_err().to_string();
    assert!(err.contains("another model") && err.contains("unet.channels: [8,16] vs [8,8]"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
