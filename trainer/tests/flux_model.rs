//! The `flux` architecture (`FluxModel`): its training forward against diffusers' numbers (the
//! golden `dev` case of `scripts/goldens/diffusers_flux.py`: the prior and the controlled
//! prediction, unpacked to latents, and the hooked features of `block_i` and
//! `single_block_i`), LISA's decoder and gradients reaching every trained part, step-0
//! identity of a ControlNet made from the transformer, the diffusers ControlNet folder it
//! writes, and the settings it refuses before building.

mod common;

use std::path::{Path, PathBuf};

use common::golden::{assert_parity, read};
use lisa_core::backend::DType;
use lisa_core::backend::prelude::*;
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::autodiff::Tape;
use lisa_trainer::model::flux::pack;
use lisa_trainer::model::sd::read_json_config;
use lisa_trainer::model::{
    Conditioning, DecoderConfig, DualDenoiser, ForwardOptions, ModelSpec, Parts, PromptEmbedding, forward_train,
    registry,
};
use serde_json::{Value, json};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flux").join(case)
}

/// The case's model spec with `extra` keys; the ControlNet's config unless `extra` makes one
/// from the transformer.
fn spec(case: &str, hook: &str, extra: Value) -> ModelSpec {
    let dir = fixture(case);
    let decoder = DecoderConfig {
        hook: Some(hook.parse().unwrap()),
        time_sinusoidal_dim: 16,
        channel_floor: 4,
        ..DecoderConfig::default()
    };
    let mut config = serde_json::Map::new();
    config.insert("transformer".into(), read_json_config(&dir.join("transformer")).unwrap().into());
    config.insert("controlnet".into(), read_json_config(&dir.join("controlnet")).unwrap().into());
    config.insert("conditioning_scale".into(), json!(0.75));
    config.insert("latent_size".into(), json!(8));
    for (k, v) in extra.as_object().unwrap() {
        match v {
            Value::Null => config.remove(k),
            v => config.insert(k.clone(), v.clone()),
        };
    }
    ModelSpec { architecture: "flux".into(), decoder, config }
}

/// The golden inputs as a conditioning (σ·1000 timesteps) and latents on the tape.
fn golden_inputs(io: &common::golden::Host) -> Conditioning {
    let (ehs, pooled) = (&io["encoder_hidden_states"], &io["pooled_projections"]);
    Conditioning {
        t: io["timestep"].1.iter().map(|s| s * 1000.0).collect(),
        prompt: PromptEmbedding::TextPooled {
            values: ehs.1.clone(),
            tokens: ehs.0.dims()[1],
            dim: ehs.0.dims()[2],
            pooled: pooled.1.clone(),
            pooled_dim: pooled.0.dims()[1],
        },
    }
}

#[test]
fn the_flux_model_trains_as_diffusers_computes() {
    let dir = fixture("dev");
    let (io, _) = read(&dir.join("io.safetensors"));
    let tensor = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &CpuDevice).unwrap();
    let cond = golden_inputs(&io);
    for (hook, feature) in [("block_0", "controlnet_hidden_0"), ("single_block_1", "controlnet_single_hidden_1")] {
        let mut model =
            registry::build::<C>(&spec("dev", hook, json!({})), Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
        assert!(model.load_main(&dir.join("transformer")).unwrap() > 0);
        assert!(model.load_side(&dir.join("controlnet")).unwrap() > 0);
        assert_eq!(model.sample_shape(), [4, 8, 8]);
        let tape = Tape::<C>::new();
        let bound = model.store().bind(&tape);
        let (x, hint) = (tape.constant(tensor("latents")), tape.constant(tensor("control_latents")));
        let out = forward_train(model.as_ref(), &bound, &x, &hint, &cond, ForwardOptions::lisa(true)).unwrap();
        let v = |t: &lisa_cpu::CpuTensor| C::to_vec(t).unwrap();
        // The spec's guidance scale (3.5, the default) is the golden's.
        assert_parity("flux prior", &v(out.prior.as_ref().unwrap()), &io["transformer_out_unpacked"].1);
        let packed = pack(&tape, &out.pred).unwrap();
        assert_parity("flux controlled", &v(&packed.value), &io["transformer_out_controlled"].1);
        assert_parity(&format!("flux {hook}"), &v(&out.hooked.as_ref().unwrap().value), &io[feature].1);
        let decoded = out.decoded.as_ref().unwrap();
        assert_eq!(C::shape(&decoded.value).dims(), &[2, 4, 8, 8], "2×2 patches back to latents");

        // LISA's loss reaches the decoder, the hooked block and everything before it.
        let target = C::random_normal(&C::shape(&out.pred.value), 7, DType::F32, &CpuDevice).unwrap();
        let tau = C::sub(&target, out.prior.as_ref().unwrap()).unwrap();
        let (_, g_pred) = C::mse_loss(&out.pred.value, &target).unwrap();
        let (l_lisa, g_dec) = C::mse_loss(&decoded.value, &tau).unwrap();
        assert!(l_lisa.is_finite() && l_lisa > 0.0);
        let leaves = bound.leaves();
        let grads = tape.backward(&[(&out.pred, g_pred), (decoded, C::scale(&g_dec, 0.2).unwrap())]).unwrap();
        let reached = |name: &str| {
            let id = model.store().find(name).unwrap_or_else(|| panic!("no parameter {name}"));
            let var = leaves.iter().find(|(p, _)| *p == id).map(|(_, v)| *v).unwrap();
            grads.get(var).is_some_and(|g| C::to_vec(g).unwrap().iter().any(|v| *v != 0.0))
        };
        for name in [
            "lisa.proj_out.bias",
            "side.controlnet_x_embedder.weight",
            "side.transformer_blocks.0.attn.norm_added_k.weight",
            "side.single_transformer_blocks.1.proj_out.weight",
            "side.controlnet_single_blocks.1.weight",
        ] {
            assert!(reached(name), "{hook}: no gradient reached {name}");
        }
        assert!(model.store().find("main.x_embedder.weight").is_some_and(|id| !model.store().get(id).trainable));
    }
}

#[test]
fn a_controlnet_from_the_transformer_starts_as_the_identity_and_saves_for_diffusers() {
    let dir = fixture("dev");
    let (io, _) = read(&dir.join("io.safetensors"));
    let tensor = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &CpuDevice).unwrap();
    let from_transformer = json!({"controlnet": null, "controlnet_layers": 1, "controlnet_single_layers": 2});
    let s = spec("dev", "single_block_1", from_transformer);
    let mut model = registry::build::<C>(&s, Parts::Dual { decoder: false }, CpuDevice, 0).unwrap();
    model.load_main(&dir.join("transformer")).unwrap();
    let tape = Tape::<C>::new();
    let bound = model.store().bind(&tape);
    let (x, hint) = (tape.constant(tensor("latents")), tape.constant(tensor("control_latents")));
    let cond = golden_inputs(&io);
    let out = forward_train(model.as_ref(), &bound, &x, &hint, &cond, ForwardOptions::lisa(false)).unwrap();
    // Zero residuals at step 0: the controlled prediction is diffusers' prior.
    assert_parity("flux step 0", &C::to_vec(&out.pred.value).unwrap(), &io["transformer_out_unpacked"].1);
    drop(bound);

    // The saved folder: the golden ControlNet's config keys and tensor names (which
    // FluxControlNetModel.from_pretrained loads), and it loads back unchanged.
    let out_dir = std::env::temp_dir().join(format!("lisa-flux-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    assert!(model.export_side(&out_dir).unwrap());
    let names = |path: &Path| -> Vec<String> { read(path).0.into_keys().collect() };
    assert_eq!(
        names(&out_dir.join("diffusion_pytorch_model.safetensors")),
        names(&dir.join("controlnet/diffusion_pytorch_model.safetensors"))
    );
    let saved = read_json_config(&out_dir).unwrap();
    assert_eq!(saved["_class_name"], "FluxControlNetModel");
    assert_eq!((saved["num_layers"].clone(), saved["num_single_layers"].clone()), (json!(1), json!(2)));
    let mut again = registry::build::<C>(&s, Parts::Dual { decoder: false }, CpuDevice, 1).unwrap();
    again.load_side(&out_dir).unwrap();
    let side = |m: &dyn DualDenoiser<C>| -> Vec<Vec<f32>> {
        m.store()
            .iter()
            .filter(|(_, p)| p.name.starts_with("side."))
            .map(|(_, p)| C::to_vec(&p.value).unwrap())
            .collect()
    };
    assert!(side(model.as_ref()) == side(again.as_ref()));
    // LISA_KEEP_FLUX_CONTROLNET=1 keeps the folder, to load it with diffusers by hand
    // (`scripts/goldens/load_controlnet.py`).
    if std::env::var_os("LISA_KEEP_FLUX_CONTROLNET").is_none() {
        let _ = std::fs::remove_dir_all(&out_dir);
    } else {
        eprintln!("kept {}", out_dir.display());
    }
}

#[test]
fn flux_settings_are_checked_before_building() {
    let refused = |case: &str, hook: &str, extra: Value| {
        let s = spec(case, hook, extra);
        let err = registry::validate(&s).expect_err("refused").to_string();
        assert!(registry::build::<C>(&s, Parts::Dual { decoder: true }, CpuDevice, 0).is_err());
        err
    };
    assert!(refused("dev", "single_block_2", json!({})).contains("single_block_0..single_block_1"));
    assert!(refused("dev", "down_1", json!({})).contains("block_0..block_0"));
    assert!(refused("union", "block_0", json!({"guidance_scale": 3.5})).contains("guidance_embeds"));
    assert!(refused("union", "block_0", json!({})).contains("control_mode"));
    assert!(refused("union", "block_0", json!({"control_mode": 3})).contains("num_mode 3"));
    assert!(refused("dev", "block_0", json!({"latent_size": 7})).contains("even"));
    assert!(refused("dev", "block_0", json!({"controlnet_layers": 2})).contains("a ControlNet config sets its own"));
    let too_deep = json!({"controlnet": null, "controlnet_layers": 3});
    assert!(refused("dev", "block_0", too_deep).contains("1..=2"));
    // Union mode with its control type builds and runs.
    let s = spec("union", "block_1", json!({"control_mode": 2}));
    registry::validate(&s).unwrap();
    let model = registry::build::<C>(&s, Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    assert_eq!(model.architecture(), "flux");
}

/// A Flux pipeline folder from the fixtures: the golden `dev` transformer, a scheduler
/// (`scheduler` as its JSON), and the SD VAE fixture (4 latent channels: 2×2 patches of them
/// are the transformer's 16 input channels).
fn pipeline_folder(name: &str, scheduler: Value) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lisa-flux-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (from, to) in [(fixture("dev").join("transformer"), "transformer"), (fixtures.join("vae"), "vae")] {
        std::fs::create_dir_all(dir.join(to)).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(from.join(f), dir.join(to).join(f)).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("scheduler")).unwrap();
    std::fs::write(dir.join("scheduler/scheduler_config.json"), scheduler.to_string()).unwrap();
    dir
}

/// FLUX.1-dev's scheduler_config.json.
fn dev_scheduler() -> Value {
    json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
           "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
           "use_dynamic_shifting": true})
}

#[test]
fn a_flux_pipeline_folder_is_read_checked_and_built() {
    use lisa_trainer::model::flux::FluxPipeline;
    use lisa_trainer::model::sd3::Sd3Pipeline;
    use lisa_trainer::scheduler::{FlowWeighting, NoiseConfig};
    let dir = pipeline_folder("dev", dev_scheduler());
    assert!(FluxPipeline::is_flux(&dir) && !Sd3Pipeline::is_sd3(&dir), "Flux's folder is not taken for SD3's");
    let pipeline = FluxPipeline::open(&dir).unwrap();
    // Dynamic shifting: training draws unshifted times; sampling shifts by the token count.
    let mu = |n| pipeline.sampling_mu(n).unwrap();
    assert!((mu(256) - 0.5).abs() < 1e-12 && (mu(4096) - 1.15).abs() < 1e-12);
    assert!((mu(1024) - (0.5 + 0.65 * 768.0 / 3840.0)).abs() < 1e-12);
    let size = pipeline.training_size(None).unwrap();
    let weighting = FlowWeighting::LogitNormal { mean: 0.0, std: 1.0 };
    let NoiseConfig::Flow { shift, precondition_outputs, sampling_shift, .. } = pipeline.noise(weighting, size) else {
        panic!()
    };
    assert_eq!((shift, precondition_outputs), (Some(1.0), false));
    assert_eq!(sampling_shift, Some(mu(32 * 32).exp()), "512 px: 32×32 tokens");
    assert_eq!((size.pixels, size.latent_side), (512, 64), "train_controlnet_flux.py's default");
    let err = pipeline.training_size(Some(520)).unwrap_err().to_string();
    assert!(err.contains("multiple of 16"), "{err}");

    // The spec, the model, and one training forward at 64 px (8×8 latents).
    let size = pipeline.training_size(Some(64)).unwrap();
    let decoder = DecoderConfig {
        hook: Some("single_block_2".parse().unwrap()),
        time_sinusoidal_dim: 16,
        channel_floor: 4,
        ..DecoderConfig::default()
    };
    let spec = pipeline
        .controlnet_spec(None, (Some(1), Some(4)), size, (Default::default(), None, None), &decoder)
        .unwrap_err()
        .to_string();
    assert!(spec.contains("0..=3"), "{spec}");
    let spec = pipeline
        .controlnet_spec(None, (Some(1), Some(3)), size, (Default::default(), Some(4.0), None), &decoder)
        .unwrap();
    let model = pipeline.build::<C>(&spec, Parts::Dual { decoder: true }, None, CpuDevice, 0).unwrap();
    assert_eq!(model.sample_shape(), [4, 8, 8]);
    let (io, _) = read(&fixture("dev").join("io.safetensors"));
    let tensor = |k: &str| C::from_slice(&io[k].1, &io[k].0, DType::F32, &CpuDevice).unwrap();
    let tape = Tape::<C>::new();
    let bound = model.store().bind(&tape);
    let (x, hint) = (tape.constant(tensor("latents")), tape.constant(tensor("control_latents")));
    let out = forward_train(&model, &bound, &x, &hint, &golden_inputs(&io), ForwardOptions::lisa(true)).unwrap();
    assert!(C::to_vec(&out.decoded.unwrap().value).unwrap().iter().all(|v| v.is_finite()));
    let _ = std::fs::remove_dir_all(&dir);

    // Bad folders: each named.
    let refused =
        |name: &str, scheduler: Value| FluxPipeline::open(&pipeline_folder(name, scheduler)).unwrap_err().to_string();
    let mut linear = dev_scheduler();
    linear["time_shift_type"] = json!("linear");
    assert!(refused("linear", linear).contains("time_shift_type"));
    assert!(refused("ddpm", json!({"_class_name": "DDPMScheduler"})).contains("FlowMatchEulerDiscreteScheduler"));
    let dir = pipeline_folder("vae16", dev_scheduler());
    let sd3_vae = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3/vae/vae/config.json");
    std::fs::copy(sd3_vae, dir.join("vae/config.json")).unwrap();
    let err = FluxPipeline::open(&dir).unwrap().training_size(None).unwrap_err().to_string();
    assert!(err.contains("latent channels"), "{err}");
    for name in ["linear", "ddpm", "vae16"] {
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("lisa-flux-pipeline-{name}-{}", std::process::id())),
        );
    }
}

/// The memory check before a run counts parameters from the config alone, exactly: the tiny
/// fixtures' weight files hold that many numbers, and at FLUX.1-dev's size it is what
/// diffusers 0.42.1 counts (`scripts/goldens/diffusers_parameter_counts.py`, same configs).
#[test]
fn parameter_counts_match_the_weights_and_diffusers_at_real_size() {
    use lisa_trainer::model::flux::{FluxConfig, FluxControlNetExtras};
    let numbers_in = |dir: &Path| -> u128 {
        let (tensors, _) = read(&dir.join("diffusion_pytorch_model.safetensors"));
        tensors.values().map(|(shape, _)| shape.num_elements().unwrap() as u128).sum()
    };
    for case in ["dev", "union"] {
        let dir = fixture(case);
        let transformer =
            FluxConfig::from_transformer_json(&read_json_config(&dir.join("transformer")).unwrap()).unwrap();
        assert_eq!(transformer.parameter_count(None), numbers_in(&dir.join("transformer")), "{case} transformer");
        let (controlnet, extras) =
            FluxConfig::from_controlnet_json(&read_json_config(&dir.join("controlnet")).unwrap()).unwrap();
        assert_eq!(controlnet.parameter_count(Some(extras)), numbers_in(&dir.join("controlnet")), "{case} ControlNet");
    }
    let dev = json!({
        "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": true, "axes_dims_rope": [16, 56, 56]
    });
    let dev = FluxConfig::from_transformer_json(dev.as_object().unwrap()).unwrap();
    assert_eq!(dev.parameter_count(None), 11_901_408_320);
    let controlnet = dev.controlnet_from_transformer(4, 4).unwrap();
    assert_eq!(controlnet.parameter_count(Some(FluxControlNetExtras::default())), 2_046_461_952);
    assert_eq!(controlnet.parameter_count(Some(FluxControlNetExtras { num_mode: Some(10) })), 2_046_492_672);
}

/// LISA on Flux against torch (`lisa.safetensors` of the dev case, `scripts/goldens/
/// diffusers_flux.py`): the token decoder on the tokens entering `controlnet_single_blocks[1]`,
/// its output in unpacked latents, the velocity-space target stopgrad(v − prior), both losses,
/// and torch-autograd gradients of `mse(controlled, v) + λ·mse(D(h, t), target)` for
/// ControlNet and decoder tensors.
#[test]
fn flux_lisa_matches_torch() {
    use common::golden::{golden_decoder, load_golden_decoder};
    let dir = fixture("dev");
    let (io, _) = read(&dir.join("io.safetensors"));
    let (lisa, meta) = read(&dir.join("lisa.safetensors"));
    let mut spec = spec("dev", &meta["hook"], json!({}));
    spec.decoder = golden_decoder(&meta["hook"], &meta);
    let mut model = registry::build::<C>(&spec, Parts::Dual { decoder: true }, CpuDevice, 0).unwrap();
    model.load_main(&dir.join("transformer")).unwrap();
    model.load_side(&dir.join("controlnet")).unwrap();
    assert_eq!(load_golden_decoder(model.as_mut(), &dir.join("lisa.safetensors"), &lisa), 6);
    let tensor = |k: &str| {
        let (shape, values) = io.get(k).or_else(|| lisa.get(k)).unwrap_or_else(|| panic!("no golden {k}"));
        C::from_slice(values, shape, DType::F32, &CpuDevice).unwrap()
    };
    let tape = Tape::<C>::new();
    let bound = model.store().bind(&tape);
    let (x, hint) = (tape.constant(tensor("latents")), tape.constant(tensor("control_latents")));
    let out =
        forward_train(model.as_ref(), &bound, &x, &hint, &golden_inputs(&io), ForwardOptions::lisa(true)).unwrap();
    let leaves = bound.leaves();
    let checked = common::golden::assert_lisa_matches("flux", model.as_ref(), &tape, &leaves, &out, &lisa, &meta);
    assert_eq!(checked, 12, "gradients checked");
}
