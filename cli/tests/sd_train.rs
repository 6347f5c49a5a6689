//! `lisa train --pretrained-model-name-or-path`: a ControlNet with LISA for a diffusers SD
//! pipeline folder (the tiny golden-file UNet, random weights, no download) on a Fill50K
//! folder with precomputed latents and text embeddings; checkpoints, an exact resume, the
//! diffusers ControlNet folder at the end, and the bad inputs of this path.

use std::path::{Path, PathBuf};

mod common;

use common::{fails_with, free_port, launched_as, lisa, ok, readme_train_command, s, wait_all};
use lisa_core::backend::prelude::*;
use lisa_core::backend::{DType, Shape};
use lisa_cpu::{CpuBackend as C, CpuDevice};
use lisa_trainer::weights::to_safetensors;

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lisa-sd-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const SCHEDULER: &str = r#"{"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear",
  "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
  "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": false}"#;

/// A pipeline folder with the tiny SD 1.5-like UNet of the golden files and a scheduler.
fn pipeline(dir: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures/sd/sd15/unet");
    let p = dir.join("pipeline");
    std::fs::create_dir_all(p.join("unet")).unwrap();
    std::fs::create_dir_all(p.join("scheduler")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fixture.join(f), p.join("unet").join(f)).unwrap();
    }
    std::fs::write(p.join("scheduler/scheduler_config.json"), SCHEDULER).unwrap();
    p
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, u64)]) {
    let made: Vec<(String, lisa_cpu::CpuTensor)> = tensors
        .iter()
        .map(|(n, shape, seed)| {
            (n.clone(), C::random_normal(&Shape::new(shape.as_slice()), *seed, DType::F32, &CpuDevice).unwrap())
        })
        .collect();
    let refs: Vec<(String, &lisa_cpu::CpuTensor)> = made.iter().map(|(n, t)| (n.clone(), t)).collect();
    std::fs::write(path, to_safetensors::<C>(&refs, Default::default()).unwrap()).unwrap();
}

const PROMPTS: [&str; 3] = ["red circle with blue background", "a green ring", "yellow on black"];

/// A Fill50K-layout folder of 3 examples: 64×64 RGB condition images (8× the 8×8 latents),
/// `latents.safetensors` and `prompt_embeds.safetensors` (5 tokens of 12, with the null
/// prompt).
fn data(dir: &Path) -> PathBuf {
    let d = dir.join("data");
    std::fs::create_dir_all(d.join("source")).unwrap();
    std::fs::create_dir_all(d.join("target")).unwrap();
    let mut lines = String::new();
    for (i, prompt) in PROMPTS.iter().enumerate() {
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            let r = ((x as i32 - 32).pow(2) + (y as i32 - 32).pow(2)) as f32;
            image::Rgb(if (r.sqrt() - 10.0 - 4.0 * i as f32).abs() < 1.5 { [255, 255, 255] } else { [0, 0, 0] })
        });
        img.save(d.join(format!("source/{i}.png"))).unwrap();
        img.save(d.join(format!("target/{i}.png"))).unwrap();
        lines +=
            &format!("{{\"source\": \"source/{i}.png\", \"target\": \"target/{i}.png\", \"prompt\": \"{prompt}\"}}\n");
    }
    std::fs::write(d.join("prompt.json"), lines).unwrap();
    let latents: Vec<_> = (0..3).map(|i| (format!("target/{i}.png"), vec![4, 8, 8], 100 + i as u64)).collect();
    write_tensors(&d.join("latents.safetensors"), &latents);
    let mut embeds: Vec<_> =
        PROMPTS.iter().enumerate().map(|(i, p)| (p.to_string(), vec![5, 12], 200 + i as u64)).collect();
    embeds.push((String::new(), vec![5, 12], 300));
    write_tensors(&d.join("prompt_embeds.safetensors"), &embeds);
    d
}

fn train(pipe: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let steps = if extra.contains(&"--max-train-steps") { &[][..] } else { &["--max-train-steps", "2"][..] };
    let mut args = vec![
        "train",
        "--pretrained-model-name-or-path",
        s(pipe),
        "--train-data-dir",
        s(data),
        "--train-batch-size",
        "2",
        "--learning-rate",
        "1e-4",
        "--checkpointing-steps",
        "1",
        "--output-dir",
        s(out),
    ];
    args.extend_from_slice(steps);
    args.extend_from_slice(extra);
    lisa(&args)
}

#[test]
fn trains_a_controlnet_with_lisa_for_a_diffusers_folder_and_resumes_exactly() {
    let dir = workdir("run");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    let err = ok(&train(&pipe, &data, &out, &[]));
    assert!(err.contains("hook down_5"), "the LISA authors' hook by default:\n{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let (loss, lisa_loss) = (l["loss"].as_f64().unwrap(), l["lisa_loss"].as_f64().unwrap());
        assert!(loss.is_finite() && loss > 0.0 && lisa_loss.is_finite() && lisa_loss > 0.0, "{l}");
    }
    for ckpt in ["checkpoint-1", "checkpoint-2"] {
        assert!(out.join(ckpt).join("state.json").is_file(), "{ckpt}");
        assert!(
            out.join(ckpt).join("controlnet/diffusion_pytorch_model.safetensors").is_file(),
            "{ckpt}: the ControlNet"
        );
    }
    // The ControlNet as a diffusers folder, loadable as the side network of the same UNet.
    let native = out.join("controlnet");
    let weights = std::fs::read(native.join("diffusion_pytorch_model.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(native.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["_class_name"], "ControlNetModel");
    // Continue training from it: --controlnet-model-name-or-path reads the folder.
    let more = dir.join("more");
    ok(&train(&pipe, &data, &more, &["--controlnet-model-name-or-path", s(&native), "--max-train-steps", "1"]));

    // Resume from step 1 in the same folder: the same step 2, bit for bit.
    let ckpt = out.join("checkpoint-1");
    ok(&train(&pipe, &data, &out, &["--resume-from-checkpoint", s(&ckpt)]));
    let again = std::fs::read(native.join("diffusion_pytorch_model.safetensors")).unwrap();
    assert!(weights == again, "the resumed run's ControlNet differs from the uninterrupted one");
    let resumed: Vec<String> =
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(String::from).collect();
    let first: Vec<String> = metrics.lines().map(String::from).collect();
    let loss = |l: &str| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap();
    assert_eq!(loss(&resumed[1]), loss(&first[1]), "step 2's loss after resuming");
}

/// `--use-ema`: the EMA ControlNet is its own diffusers folder beside the trained one (and in
/// every checkpoint), starts as a copy (diffusers' warm-up: decay 0 at the first update), lags
/// later, and a resumed run continues it bit for bit.
#[test]
fn an_ema_controlnet_is_kept_saved_and_resumed_exactly() {
    let dir = workdir("ema");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    let ema = ["--use-ema", "--ema-decay", "0.9", "--max-train-steps", "3"];
    let err = ok(&train(&pipe, &data, &out, &ema));
    assert!(err.contains("controlnet_ema"), "the EMA folder is named:\n{err}");
    let weights = |folder: &Path| std::fs::read(folder.join("diffusion_pytorch_model.safetensors")).unwrap();
    let config = |folder: &Path| std::fs::read_to_string(folder.join("config.json")).unwrap();
    let names = |folder: &Path| {
        let path = folder.join("diffusion_pytorch_model.safetensors");
        let tensors = lisa_trainer::weights::read_safetensors(&path).unwrap();
        tensors.into_iter().map(|(name, (shape, _))| (name, shape.dims().to_vec())).collect::<Vec<_>>()
    };
    let (trained, averaged) = (out.join("controlnet"), out.join("controlnet_ema"));
    assert_eq!(config(&trained), config(&averaged));
    assert_eq!(names(&trained), names(&averaged), "the same tensors, for ControlNetModel.from_pretrained");
    assert!(weights(&trained) != weights(&averaged), "after 3 steps the average lags the weights");
    let first = out.join("checkpoint-1");
    assert!(weights(&first.join("controlnet")) == weights(&first.join("controlnet_ema")), "step 1: a copy");
    // Resume from step 1: the same EMA at step 3, bit for bit.
    let before = weights(&averaged);
    ok(&train(&pipe, &data, &out, &[&ema[..], &["--resume-from-checkpoint", s(&first)]].concat()));
    assert!(before == weights(&averaged), "the resumed run's EMA ControlNet differs from the uninterrupted one");
    // Bad settings are named by their flag before any work.
    fails_with(&train(&pipe, &data, &dir.join("bad"), &["--use-ema", "--ema-decay", "1.5"]), "--ema-decay");
    fails_with(&train(&pipe, &data, &dir.join("bad"), &["--ema-decay", "0.9"]), "--use-ema");
    assert!(!dir.join("bad/metrics.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--report-to tensorboard`: every step's losses, learning rate and speed, each validation's
/// grid, as TensorBoard event files in OUTPUT/logs/train_controlnet (metrics.jsonl as ever);
/// a resumed run starts a new file whose session start drops the redone steps.
#[test]
fn tensorboard_event_files_record_the_run_and_its_resume() {
    let dir = workdir("tensorboard");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let out = dir.join("out");
    let cond = data.join("source/0.png");
    let flags = [
        "--report-to",
        "tensorboard",
        "--validation-image",
        s(&cond),
        "--validation-prompt",
        "a red circle",
        "--validation-steps",
        "2",
    ];
    let err = ok(&train(&pipe, &data, &out, &flags));
    assert!(err.contains("TensorBoard event file"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    let logs = out.join("logs/train_controlnet");
    let files = common::event_files(&logs);
    assert_eq!(files.len(), 1, "{files:?}");
    let events = common::read_events(&files[0]);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[1].session_start && events[1].step == 1, "a fresh run starts at step 1");
    let scalar_steps = |events: &[common::TbEvent], tag: &str| -> Vec<i64> {
        events.iter().filter(|e| e.scalars.iter().any(|(t, v)| t == tag && v.is_finite())).map(|e| e.step).collect()
    };
    for tag in ["train/loss", "train/diffusion_loss", "train/lisa_loss", "train/lr", "train/grad_norm"] {
        assert_eq!(scalar_steps(&events, tag), [1, 2], "{tag}");
    }
    let images: Vec<_> = events.iter().flat_map(|e| e.images.iter().map(move |i| (e.step, i))).collect();
    assert_eq!(images.len(), 1);
    let (step, (tag, w, h, png)) = images[0];
    assert_eq!((step, tag.as_str(), *w, *h), (2, "validation/grid", 5 * 66, 66));
    let validated: Vec<_> =
        events.iter().filter(|e| e.scalars.iter().any(|(t, _)| t == "validation/control_f1")).collect();
    assert_eq!(validated.len(), 1, "the control metric at the validated step");
    assert_eq!(png, &std::fs::read(out.join("validation-000002.png")).unwrap(), "the grid's PNG");
    // Resume from step 1: a second file, whose session start at step 2 drops the first
    // file's step 2 in TensorBoard.
    let first = out.join("checkpoint-1");
    let resume = [&flags[..], &["--resume-from-checkpoint", s(&first)]].concat();
    ok(&train(&pipe, &data, &out, &resume));
    let files = common::event_files(&logs);
    assert_eq!(files.len(), 2, "{files:?}");
    let events = common::read_events(&files[1]);
    assert!(events[1].session_start && events[1].step == 2, "the resumed run starts at step 2");
    assert_eq!(scalar_steps(&events, "train/loss"), [2]);
    // Trackers lisa does not write are refused by name before any work.
    fails_with(&train(&pipe, &data, &dir.join("bad"), &["--report-to", "wandb"]), "tensorboard");
    fails_with(
        &train(&pipe, &data, &dir.join("bad"), &["--report-to", "tensorboard", "--tracker-project-name", "a/b"]),
        "--tracker-project-name",
    );
    assert!(!dir.join("bad").exists());
    if std::env::var_os("LISA_KEEP_TENSORBOARD").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("kept {}", logs.display());
    }
}

/// `--dataset-name`: the Hugging Face `datasets` layouts users keep (save_to_disk, the Hub's
/// Parquet files, JPEG images under other column names), written by the real `datasets`
/// (`scripts/goldens/hf_datasets.py`), and `--train-shards`: webdataset tar shards; each
/// converted once into the cache and trained on; bad rows, samples and columns are named by
/// file, row (sample) and column before any training.
#[test]
fn datasets_train_as_users_keep_them() {
    use std::sync::Arc;
    let dir = workdir("datasets");
    let pipe = full_pipeline(&dir);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/datasets");
    let cache = dir.join("cache");
    let run = |dataset: &Path, out: &str, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--pretrained-model-name-or-path",
            s(&pipe),
            "--dataset-name",
            s(dataset),
            "--cache-dir",
            s(&cache),
            "--max-train-steps",
            "1",
            "--train-batch-size",
            "2",
            "--output-dir",
        ];
        let out = dir.join(out);
        args.push(s(&out));
        args.extend_from_slice(extra);
        let o = lisa(
            &args.iter().map(|a| a.to_string()).collect::<Vec<_>>().iter().map(String::as_str).collect::<Vec<_>>(),
        );
        (o, out)
    };
    // A wrong flag is an error before the (possibly long) conversion starts.
    fails_with(&run(&fixtures.join("saved"), "bad-resolution", &["--resolution", "13"]).0, "--resolution");
    assert!(!cache.join("datasets").exists(), "nothing converted for a run refused by its flags");
    let (o, out) = run(&fixtures.join("saved"), "saved", &[]);
    let err = ok(&o);
    assert!(err.contains("converted 3 rows") && err.contains("cached 3 latents"), "{err}");
    assert!(
        err.contains(r#"images from column "image", conditions from "conditioning_image", prompts from "text""#),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 1);
    // A second run reuses the conversion.
    let err = ok(&run(&fixtures.join("saved"), "again", &[]).0);
    assert!(err.contains("using the converted dataset") && !err.contains("converted 3 rows"), "{err}");
    // The Hub's Parquet layout (Snappy): the train split only, not the test split beside it.
    let err = ok(&run(&fixtures.join("hub"), "hub", &[]).0);
    assert!(err.contains("converted 3 rows"), "{err}");
    // JPEG images under other names, given by flag.
    let named = ["--image-column", "target", "--conditioning-image-column", "hint", "--caption-column", "prompt"];
    let err = ok(&run(&fixtures.join("jpeg"), "jpeg", &named).0);
    assert!(err.contains("converted 3 rows"), "{err}");
    let converted: Vec<_> =
        std::fs::read_dir(dir.join("cache/datasets")).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
    assert_eq!(converted.len(), 3, "one folder per dataset");
    // The datasets cache's naming (`name-train.arrow` beside `name-test.arrow`): the train
    // split only; split-named files without a train split are refused.
    let cached = dir.join("cached");
    std::fs::create_dir_all(&cached).unwrap();
    for split in ["train", "test"] {
        let arrow = fixtures.join("saved/data-00000-of-00001.arrow");
        std::fs::copy(&arrow, cached.join(format!("fill50k-{split}.arrow"))).unwrap();
    }
    let err = ok(&run(&cached, "cached-run", &[]).0);
    assert!(err.contains("converted 3 rows"), "the test split left out:\n{err}");
    std::fs::remove_file(cached.join("fill50k-train.arrow")).unwrap();
    fails_with(&run(&cached, "bad-split", &[]).0, "split into test and none is train");
    // A column that does not exist is named with the ones that do.
    let o = run(&fixtures.join("saved"), "bad-column", &["--caption-column", "caption"]).0;
    fails_with(&o, r#"--caption-column "caption""#);
    fails_with(&o, "columns: image, text, conditioning_image");
    // A column of a type lisa cannot read as the part asked for is named with its type.
    fails_with(&run(&fixtures.join("saved"), "bad-column", &["--caption-column", "image"]).0, "is no text");
    // A null image and a WebP image are named by file, row and column.
    let mut good = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(16, 16).write_to(&mut good, image::ImageFormat::Png).unwrap();
    let good = good.into_inner();
    let table = |images: Vec<Option<&[u8]>>| -> PathBuf {
        use arrow_array::{BinaryArray, RecordBatch, StringArray};
        let n = images.len();
        let batch = RecordBatch::try_from_iter([
            ("image", Arc::new(BinaryArray::from(images)) as arrow_array::ArrayRef),
            ("text", Arc::new(StringArray::from(vec!["a prompt"; n])) as _),
            ("conditioning_image", Arc::new(BinaryArray::from(vec![Some(good.as_slice()); n])) as _),
        ])
        .unwrap();
        let path = dir.join(format!("bad-{n}.arrow"));
        let file = std::fs::File::create(&path).unwrap();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(file, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        path
    };
    let null = table(vec![Some(good.as_slice()), None]);
    fails_with(&run(&null, "bad-null", &[]).0, r#"row 1, column "image": no image (null)"#);
    let webp = table(vec![Some(b"RIFF\0\0\0\0WEBPVP8 ".as_slice()), Some(good.as_slice()), Some(good.as_slice())]);
    fails_with(&run(&webp, "bad-webp", &[]).0, r#"row 0, column "image": a WebP image; lisa reads PNG and JPEG"#);
    // Asked to, the bad rows are skipped and counted, the first named.
    let err = ok(&run(&webp, "skipped", &["--skip-bad-rows"]).0);
    assert!(err.contains("skipped 1 row(s)") && err.contains("row 0") && err.contains("converted 2 rows"), "{err}");
    fails_with(&train(&pipe, &dir.join("data"), &dir.join("bad-skip"), &["--skip-bad-rows"]), "are for --dataset-name");
    // webdataset shards: two tars, samples of a PNG, its outline and a caption each.
    let shard = |name: &str, samples: &[(&str, &[&str])]| {
        let mut b = tar::Builder::new(std::fs::File::create(dir.join(name)).unwrap());
        for (key, parts) in samples {
            for part in *parts {
                let bytes: &[u8] = if *part == "txt" { b"a red circle" } else { &good };
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                b.append_data(&mut header, format!("{key}.{part}"), bytes).unwrap();
            }
        }
        b.finish().unwrap();
    };
    let full: &[&str] = &["png", "cond.png", "txt"];
    shard("shard-000.tar", &[("a/s0", full), ("a/s1", full)]);
    shard("shard-001.tar", &[("b/s2", full)]);
    let pattern = format!("{}/shard-{{000..001}}.tar", dir.display());
    let shards = |out: &str, extra: &[&str]| {
        let out = dir.join(out);
        let args = [&["train", "--pretrained-model-name-or-path", s(&pipe), "--train-shards", &pattern][..], extra];
        let args = [&args.concat()[..], &["--cache-dir", s(&cache), "--max-train-steps", "1", "--output-dir", s(&out)]];
        lisa(&args.concat())
    };
    let err = ok(&shards("shards", &[]));
    assert!(err.contains("converted 3 rows") && err.contains("cached 3 latents"), "{err}");
    // The images stay in the shards: the index references them, nothing is copied out.
    let index = std::fs::read_dir(cache.join("datasets"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|d| std::fs::read_to_string(d.join("prompt.json")).is_ok_and(|t| t.contains("shard-000.tar#")))
        .expect("the shards' index");
    assert_eq!(std::fs::read_dir(index.join("target")).unwrap().count(), 0, "no image copied");
    // A sample without its caption is named by shard and sample; a missing shard by name.
    shard("shard-001.tar", &[("b/s2", &["png", "cond.png"])]);
    fails_with(&shards("bad-shard", &[]), r#"shard-001.tar: sample "b/s2" (parts png, cond.png): no txt part"#);
    std::fs::remove_file(dir.join("shard-001.tar")).unwrap();
    fails_with(&shards("bad-shard", &[]), "shard-001.tar is not a file (2 shard(s) named)");
    fails_with(&run(&fixtures.join("saved"), "bad-shard", &["--train-shards", "x.tar"]).0, "cannot be used with");
    for bad in ["bad-resolution", "bad-column", "bad-null", "bad-webp", "bad-shard", "bad-skip", "bad-split"] {
        assert!(!dir.join(bad).join("metrics.jsonl").exists(), "{bad}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--mixed-precision fp16` autocasts and scales the loss: every metrics row carries the
/// scale (torch's first, 2^16) and whether the step was skipped, and a resumed run continues
/// the scaler where the checkpoint left it.
#[test]
fn fp16_training_scales_the_loss_logs_the_scale_and_resumes_it() {
    let dir = workdir("fp16");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    let err = ok(&train(&pipe, &data, &out, &["--mixed-precision", "fp16", "--max-train-steps", "3"]));
    assert!(err.contains("stored in fp16") && err.contains("scaled dynamically"), "{err}");
    let rows = |out: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let mut rows: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        for r in &mut rows {
            let r = r.as_object_mut().unwrap();
            // The speed, and the run id a session writes on its first row.
            r.remove("steps_per_s");
            r.remove("run");
        }
        rows
    };
    let first = rows(&out);
    assert_eq!(first.len(), 3);
    for r in &first {
        assert_eq!(r["loss_scale"].as_f64(), Some(65536.0), "{r}");
        assert_eq!(r["skipped"].as_bool(), Some(false), "{r}");
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint-2/state.json")).unwrap()).unwrap();
    assert_eq!(state["state"]["loss_scale"], serde_json::json!({"log2": 16, "good_steps": 2}), "{state}");
    let native = std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    ok(&train(
        &pipe,
        &data,
        &out,
        &[
            "--mixed-precision",
            "fp16",
            "--max-train-steps",
            "3",
            "--resume-from-checkpoint",
            s(&out.join("checkpoint-2")),
        ],
    ));
    assert_eq!(rows(&out), first, "the resumed run's metrics differ");
    let again = std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(native == again, "the resumed fp16 run's ControlNet differs");
}

#[test]
fn bad_pipelines_and_data_are_named_before_training() {
    let dir = workdir("bad");
    let (pipe, data) = (pipeline(&dir), data(&dir));
    let out = dir.join("out");
    // A folder without a scheduler.
    let no_sched = dir.join("no-scheduler");
    std::fs::create_dir_all(no_sched.join("unet")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(pipe.join("unet").join(f), no_sched.join("unet").join(f)).unwrap();
    }
    fails_with(&train(&no_sched, &data, &out, &[]), "has no scheduler/");
    // An unknown beta schedule.
    std::fs::write(pipe.join("scheduler/scheduler_config.json"), SCHEDULER.replace("scaled_linear", "sigmoid"))
        .unwrap();
    fails_with(&train(&pipe, &data, &out, &[]), "beta_schedule \"sigmoid\" is not supported");
    std::fs::write(pipe.join("scheduler/scheduler_config.json"), SCHEDULER).unwrap();
    // An unsupported UNet key.
    let cfg = std::fs::read_to_string(pipe.join("unet/config.json")).unwrap();
    std::fs::write(
        pipe.join("unet/config.json"),
        cfg.replace("\"class_embed_type\": null", "\"class_embed_type\": \"timestep\""),
    )
    .unwrap();
    fails_with(&train(&pipe, &data, &out, &[]), "class_embed_type");
    std::fs::write(pipe.join("unet/config.json"), &cfg).unwrap();
    // A prompt without an embedding.
    let list = std::fs::read_to_string(data.join("prompt.json")).unwrap();
    std::fs::write(data.join("prompt.json"), list.replace("a green ring", "a purple ring")).unwrap();
    fails_with(&train(&pipe, &data, &out, &[]), "prompt \"a purple ring\" has no embedding");
    // A target without a latent.
    std::fs::write(data.join("prompt.json"), list.replace("target/2.png", "target/9.png")).unwrap();
    std::fs::copy(data.join("target/2.png"), data.join("target/9.png")).unwrap();
    fails_with(&train(&pipe, &data, &out, &[]), "has no latent named \"target/9.png\"");
    std::fs::write(data.join("prompt.json"), &list).unwrap();
    // A latent holding NaN is named, with its line, before any step.
    let latents = std::fs::read(data.join("latents.safetensors")).unwrap();
    let mut poisoned = latents.clone();
    let header_len = u64::from_le_bytes(latents[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&latents[8..8 + header_len]).unwrap();
    let at = 8 + header_len + header["target/1.png"]["data_offsets"][0].as_u64().unwrap() as usize;
    poisoned[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(data.join("latents.safetensors"), &poisoned).unwrap();
    let o = train(&pipe, &data, &out, &[]);
    fails_with(&o, "the latent \"target/1.png\" holds NaN or infinite values");
    fails_with(&o, "line 2 of prompt.json");
    std::fs::write(data.join("latents.safetensors"), &latents).unwrap();
    // A truncated UNet weights file names the file.
    let w = std::fs::read(pipe.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(pipe.join("unet/diffusion_pytorch_model.safetensors"), &w[..w.len() / 3]).unwrap();
    fails_with(&train(&pipe, &data, &out, &[]), "diffusion_pytorch_model.safetensors");
    std::fs::write(pipe.join("unet/diffusion_pytorch_model.safetensors"), &w).unwrap();
    // Nothing was written for the failed runs.
    assert!(!out.join("metrics.jsonl").exists());
    // --main and a diffusers folder together.
    fails_with(
        &lisa(&["train", "--main", "x.safetensors", "--pretrained-model-name-or-path", s(&pipe)]),
        "cannot be used with",
    );
}

/// A README command's words for the tiny run in `dir`: the pipeline and data folders for
/// `PIPELINE` and `DATA`, `runs/…` under `dir`, 2 steps for 10000; nothing else changed.
fn tiny_readme_args(words: &[String], pipe: &Path, data: &Path, dir: &Path) -> Vec<String> {
    words
        .iter()
        .map(|w| match w.as_str() {
            "PIPELINE" => s(pipe).to_string(),
            "10000" => "2".to_string(),
            other if other.starts_with("runs/") => s(&dir.join(other)).to_string(),
            other => other.replacen("DATA", s(data), 1),
        })
        .collect()
}

/// The README's `lisa train` command for SD, as written, on the tiny full pipeline (folders
/// and step count swapped for tiny ones, nothing else).
#[test]
fn the_readme_sd_command_runs_as_written() {
    let words = readme_train_command("## Stable Diffusion ControlNets");
    let dir = workdir("readme");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let out = dir.join("runs/sd");
    let args = tiny_readme_args(&words, &pipe, &data, &dir);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&lisa(&refs));
    assert!(out.join("controlnet/diffusion_pytorch_model.safetensors").is_file());
    assert!(out.join("validation-000002.png").is_file());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
}

/// The README's training-conveniences command, as written, on the tiny SD pipeline.
#[test]
fn the_readme_conveniences_command_runs_as_written() {
    let words = readme_train_command("### Training conveniences");
    let dir = workdir("readme-conveniences");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let out = dir.join("runs/sd-ema");
    let args = tiny_readme_args(&words, &pipe, &data, &dir);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&lisa(&refs));
    for folder in ["controlnet", "controlnet_ema"] {
        assert!(out.join(folder).join("diffusion_pytorch_model.safetensors").is_file(), "{folder}");
    }
    assert_eq!(common::event_files(&out.join("logs/train_controlnet")).len(), 1, "the TensorBoard file");
    // Then the baseline run and the comparison the README shows after it.
    let runs = dir.join("runs");
    let swap = |words: Vec<String>| tiny_readme_args(&words, &pipe, &data, &dir);
    let baseline = swap(common::readme_command("**Comparing two runs**", "train"));
    ok(&lisa(&baseline.iter().map(String::as_str).collect::<Vec<_>>()));
    let compare = swap(common::readme_command("**Comparing two runs**", "compare"));
    let compare: Vec<&str> = compare.iter().map(String::as_str).collect();
    let output = lisa(&compare);
    ok(&output);
    let said = String::from_utf8_lossy(&output.stdout).to_string();
    let settings = "training settings that differ (sd-ema vs sd-baseline): mode: \"lisa\" vs \"baseline\"\n";
    for want in [settings, "circle_iou, per validation step", "sd-ema: 1 validations", "sd-baseline: 1 validations"] {
        assert!(said.contains(want), "{want:?} in:\n{said}");
    }
    let chart = image::open(runs.join("compare.png")).unwrap();
    assert_eq!((chart.width(), chart.height()), (860, 640), "two panels");
    // The chart is not replaced unasked; a column neither run has is named.
    fails_with(&lisa(&compare), "--overwrite");
    fails_with(
        &lisa(&[&compare[..], &["--overwrite", "--metric", "depth_error"]].concat()),
        "no value of \"depth_error\"",
    );
    assert!(out.join("validation-000002.png").is_file());
    if std::env::var_os("LISA_KEEP_COMPARE").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The README's SDXL command, as written, on the tiny SDXL pipeline (folders and the step
/// count swapped for tiny ones, the resolution for the tiny UNet's 64 px).
#[test]
fn the_readme_sdxl_command_runs_as_written() {
    let words = readme_train_command("### SDXL");
    let dir = workdir("readme-sdxl");
    let (pipe, data) = (sdxl_pipeline(&dir), images_only(&dir));
    let vae = dir.join("vae-fp16-fix");
    copy_files(&pipe.join("vae"), &vae);
    let out = dir.join("runs/sdxl");
    let args: Vec<String> = words
        .iter()
        .map(|w| match w.as_str() {
            "SDXL_PIPELINE" => s(&pipe).to_string(),
            "SDXL_VAE" => s(&vae).to_string(),
            "runs/sdxl" => s(&out).to_string(),
            "10000" => "2".to_string(),
            "1024" => "64".to_string(),
            other => other.replacen("DATA", s(&data), 1),
        })
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&lisa(&refs));
    assert!(out.join("controlnet/diffusion_pytorch_model.safetensors").is_file());
    assert!(out.join("validation-000002.png").is_file());
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A complete tiny SD pipeline that lisa writes itself (random UNet weights; the VAE, text
/// encoder and tokenizer of the golden files, whose width the UNet's cross-attention takes).
fn full_pipeline(dir: &Path) -> PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures");
    let mut unet = lisa_trainer::model::sd::read_json_config(&fixtures.join("sd/sd15/unet")).unwrap();
    unet.insert("cross_attention_dim".into(), serde_json::json!(32));
    write_pipeline(
        &dir.join("full-pipeline"),
        &unet,
        &[("clip/text_encoder", "text_encoder"), ("clip/tokenizer", "tokenizer")],
    )
}

/// A complete tiny SDXL pipeline: the golden SDXL UNet's layout (`text_time`, a DownBlock2D
/// first, two transformer layers deeper down) with random weights, as wide as its two text
/// encoders' states together (32 + 24) and their pooled projection (20 + 6 × 4 time ids).
fn sdxl_pipeline(dir: &Path) -> PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures");
    let mut unet = lisa_trainer::model::sd::read_json_config(&fixtures.join("sd/sdxl/unet")).unwrap();
    unet.insert("cross_attention_dim".into(), serde_json::json!(56));
    unet.insert("projection_class_embeddings_input_dim".into(), serde_json::json!(44));
    let text = [
        ("clip/text_encoder", "text_encoder"),
        ("clip/tokenizer", "tokenizer"),
        ("sd3/text/text_encoder_2", "text_encoder_2"),
        ("sd3/text/tokenizer_2", "tokenizer_2"),
    ];
    write_pipeline(&dir.join("sdxl-pipeline"), &unet, &text)
}

/// Writes a pipeline folder at `p`: the UNet of config `unet` with seeded random weights, the
/// scheduler, the golden VAE and the fixture folders `text` (`(from, to)`).
fn write_pipeline(p: &Path, unet: &serde_json::Map<String, serde_json::Value>, text: &[(&str, &str)]) -> PathBuf {
    use lisa_trainer::model::sd::{SdUNet, UNetConfig};
    use lisa_trainer::params::ParamStore;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../trainer/tests/fixtures");
    for part in ["unet", "scheduler", "vae"].into_iter().chain(text.iter().map(|t| t.1)) {
        std::fs::create_dir_all(p.join(part)).unwrap();
    }
    let config = UNetConfig::from_unet_json(unet).unwrap();
    let mut store = lisa_trainer::params::ParamStore::<C>::new(CpuDevice, 11);
    SdUNet::new(&mut store, "", &config).unwrap();
    let store: &ParamStore<C> = &store;
    let tensors: Vec<(String, &lisa_cpu::CpuTensor)> = store.iter().map(|(_, q)| (q.name.clone(), &q.value)).collect();
    std::fs::write(
        p.join("unet/diffusion_pytorch_model.safetensors"),
        to_safetensors::<C>(&tensors, Default::default()).unwrap(),
    )
    .unwrap();
    std::fs::write(p.join("unet/config.json"), serde_json::to_string_pretty(unet).unwrap()).unwrap();
    std::fs::write(p.join("scheduler/scheduler_config.json"), SCHEDULER).unwrap();
    copy_files(&fixtures.join("vae"), &p.join("vae"));
    std::fs::remove_file(p.join("vae/io.safetensors")).unwrap();
    for (from, to) in text {
        copy_files(&fixtures.join(from), &p.join(to));
    }
    p.to_path_buf()
}

/// Copies the files (not the folders) of `from` into `to`.
fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap().path();
        if e.is_file() {
            std::fs::copy(&e, to.join(e.file_name().unwrap())).unwrap();
        }
    }
}

/// Fill50K images only: `lisa` computes the latents and text embeddings itself.
fn images_only(dir: &Path) -> PathBuf {
    let d = data(dir);
    std::fs::remove_file(d.join("latents.safetensors")).unwrap();
    std::fs::remove_file(d.join("prompt_embeds.safetensors")).unwrap();
    d
}

#[test]
fn end_to_end_from_a_full_pipeline_with_cached_encoders_validation_and_resume() {
    let dir = workdir("full");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let out = dir.join("out");
    let cond = data.join("source/0.png");
    let extra = ["--validation-image", s(&cond), "--validation-prompt", "a red circle", "--validation-steps", "2"];
    let err = ok(&train(&pipe, &data, &out, &extra));
    assert!(err.contains("cached 3 latents"), "{err}");
    for f in [
        "cache/latents.safetensors",
        "cache/prompt_embeds.safetensors",
        "validation-000002.png",
        "controlnet/config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}:\n{err}");
    }
    let grid = image::open(out.join("validation-000002.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (5 * 66, 66), "a condition | 4 samples row of 64 px (4 seeds)");
    // The control metric: the conditions are closed outlines (Fill50K-style), so every row
    // carries the circle IoU and the edge F1 and SSIM columns, numbers at the validated step,
    // null elsewhere.
    assert!(err.contains("control metric at every validation") && err.contains("1 pair(s) × 4 seed(s)"), "{err}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows[0]["control_f1"].is_null() && rows[0].get("control_ssim").is_some(), "{}", rows[0]);
    for column in ["circle_iou", "control_f1", "control_ssim"] {
        let v = rows[1][column].as_f64().unwrap_or(f64::NAN);
        assert!((-1.0..=1.0).contains(&v), "{column} at step 2: {}", rows[1]);
    }
    assert!(err.contains("validation circle_iou"), "the progress shows the headline score:\n{err}");
    // The cache is reused by a resumed run (same data, resolution, encoders), and the resumed
    // step 2 is the uninterrupted one.
    let weights = std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    let ckpt = out.join("checkpoint-1");
    let err = ok(&train(&pipe, &data, &out, &[&extra[..], &["--resume-from-checkpoint", s(&ckpt)]].concat()));
    assert!(err.contains("using the cached latents"), "{err}");
    assert!(weights == std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap());
    // Another resolution: new latents (16×16), cropped conditions at 128 px.
    let out2 = dir.join("out-128");
    let err = ok(&train(
        &pipe,
        &data,
        &out2,
        &["--resolution", "128", "--max-train-steps", "1", "--proportion-empty-prompts", "0.5"],
    ));
    assert!(err.contains("(4×16×16)"), "{err}");
    // Mixed precision: the frozen UNet, VAE and text encoder in bf16 (their own cache),
    // the ControlNet in f32 (its diffusers folder too).
    let out_bf16 = dir.join("out-bf16");
    let bf16 =
        ["--mixed-precision", "bf16", "--gradient-checkpointing", "--max-train-steps", "1", "--validation-steps", "1"];
    let err = ok(&train(&pipe, &data, &out_bf16, &[&bf16[..], &extra[..4]].concat()));
    assert!(err.contains("cached 3 latents") && out_bf16.join("validation-000001.png").is_file(), "{err}");
    assert!(
        err.contains("stored in bf16") && err.contains("autocast") && err.contains("no bf16 tensor cores here"),
        "{err}"
    );
    let line = std::fs::read_to_string(out_bf16.join("metrics.jsonl")).unwrap();
    let loss =
        serde_json::from_str::<serde_json::Value>(line.lines().next().unwrap()).unwrap()["loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    let cn = std::fs::read(out_bf16.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    assert!(String::from_utf8_lossy(&cn[..2000]).contains("F32"), "the ControlNet is saved in f32");
    fails_with(&train(&pipe, &data, &dir.join("out-bad-precision"), &["--mixed-precision", "fp8"]), "no | fp16 | bf16");
    // A user file where the cache would go is refused, not overwritten.
    let out3 = dir.join("out-user-file");
    std::fs::create_dir_all(out3.join("cache")).unwrap();
    std::fs::write(out3.join("cache/latents.safetensors"), b"mine").unwrap();
    fails_with(&train(&pipe, &data, &out3, &[]), "latents.safetensors");
    assert_eq!(std::fs::read(out3.join("cache/latents.safetensors")).unwrap(), b"mine");
    // Missing encoders, a bad validation image, an out-of-range proportion.
    std::fs::rename(pipe.join("text_encoder"), dir.join("te")).unwrap();
    fails_with(&train(&pipe, &data, &dir.join("out4"), &[]), "has no text_encoder/");
    std::fs::rename(dir.join("te"), pipe.join("text_encoder")).unwrap();
    std::fs::write(dir.join("bad.png"), b"not a png").unwrap();
    let bad = dir.join("bad.png");
    fails_with(
        &train(&pipe, &data, &dir.join("out5"), &["--validation-image", s(&bad), "--validation-prompt", "x"]),
        "bad.png",
    );
    fails_with(&train(&pipe, &data, &dir.join("out6"), &["--proportion-empty-prompts", "1.5"]), "proportion");
    // A photo-like condition (a colour ramp) is no edge map: no control metric, said once;
    // one seed per pair gives one sample per row.
    let photo = dir.join("photo.png");
    image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([4 * x as u8, 4 * y as u8, 128])).save(&photo).unwrap();
    let out8 = dir.join("out8");
    let one = ["--validation-image", s(&photo), "--validation-prompt", "x", "--num-validation-images", "1"];
    let err = ok(&train(&pipe, &data, &out8, &[&one[..], &["--max-train-steps", "1"]].concat()));
    assert_eq!(err.matches("no control metric").count(), 1, "{err}");
    let grid = image::open(out8.join("validation-000001.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (2 * 66, 66));
    assert!(!std::fs::read_to_string(out8.join("metrics.jsonl")).unwrap().contains("control_f1"));
    fails_with(&train(&pipe, &data, &dir.join("out9"), &["--num-validation-images", "0"]), "--num-validation-images 0");
    // One check of the resolution, by the library's VAE config, named after the flag.
    fails_with(
        &train(&pipe, &data, &dir.join("out7"), &["--resolution", "20"]),
        "--resolution: 20 px is not a positive multiple of the VAE's downscale 8",
    );
}

/// Sets the modification time of `file` to `age` ago.
fn backdate(file: &Path, age: std::time::Duration) {
    let when = std::time::SystemTime::now() - age;
    std::fs::File::options().write(true).open(file).unwrap().set_modified(when).unwrap();
}

#[test]
fn the_input_cache_rehashes_only_encoder_files_that_changed() {
    let dir = workdir("digests");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let cache = dir.join("cache");
    // Files written in the last seconds are hashed at every start (a write within a
    // timestamp's granularity could keep size, time and header): these were written an hour ago.
    let hour = std::time::Duration::from_secs(3600);
    for part in ["vae", "text_encoder", "tokenizer"] {
        for file in std::fs::read_dir(pipe.join(part)).unwrap() {
            backdate(&file.unwrap().path(), hour);
        }
    }
    let run =
        |out: &str| ok(&train(&pipe, &data, &dir.join(out), &["--cache-dir", s(&cache), "--max-train-steps", "1"]));
    let err = run("out1");
    assert!(err.contains("hashed 6 of 6 encoder files") && err.contains("cached 3 latents"), "{err}");
    assert!(cache.join("encoder_digests.json").is_file());

    // (a) A second start reads none of them again and reuses the cache.
    let err = run("out2");
    assert!(err.contains("encoder files unchanged since their digests were recorded: 6 files not re-read"), "{err}");
    assert!(!err.contains("hashed") && err.contains("using the cached latents"), "{err}");

    // (b) An edited weight (same size, same header, another modification time) is hashed
    // again, alone, and the cache made from it is rebuilt.
    let vae = pipe.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1; // the lowest mantissa bit of the first weight
    std::fs::write(&vae, &bytes).unwrap();
    backdate(&vae, hour / 2);
    let err = run("out3");
    assert!(
        err.contains("hashed 1 of 6 encoder files") && err.contains("vae/diffusion_pytorch_model.safetensors"),
        "{err}"
    );
    assert!(err.contains("cached 3 latents"), "the key changed, so the cache is made again:\n{err}");

    // The record is lisa's: a file of the user's in its place is refused, not overwritten.
    let other = dir.join("cache-user");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("encoder_digests.json"), b"{\"mine\": 1}").unwrap();
    fails_with(
        &train(&pipe, &data, &dir.join("out4"), &["--cache-dir", s(&other), "--max-train-steps", "1"]),
        "not lisa's record of encoder digests",
    );
    assert_eq!(std::fs::read(other.join("encoder_digests.json")).unwrap(), b"{\"mine\": 1}");
}

/// A copy of `pipe` whose text encoder differs (the lowest bit of its first weight flipped).
fn other_text_encoder(pipe: &Path, to: &Path) -> PathBuf {
    for part in ["unet", "scheduler", "vae", "text_encoder", "tokenizer"] {
        std::fs::create_dir_all(to.join(part)).unwrap();
        for e in std::fs::read_dir(pipe.join(part)).unwrap() {
            let e = e.unwrap().path();
            std::fs::copy(&e, to.join(part).join(e.file_name().unwrap())).unwrap();
        }
    }
    let weights = std::fs::read_dir(to.join("text_encoder"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1;
    std::fs::write(&weights, &bytes).unwrap();
    to.to_path_buf()
}

/// The SD inputs are known by their contents: a shared cache is locked and never mixes two
/// runs' inputs, an edited cached embedding or a damaged ControlNet export is caught on
/// resume, gradient checkpointing may change on resume, a cache never goes inside the data.
#[test]
fn sd_inputs_are_known_by_content_and_a_shared_cache_is_safe() {
    let dir = workdir("content");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let cache = dir.join("cache");
    let cache_arg = cache.to_str().unwrap().to_string();
    let with_cache = |extra: &[&str]| -> Vec<String> {
        ["--cache-dir", cache_arg.as_str()].iter().chain(extra).map(|a| a.to_string()).collect()
    };
    let train = |pipe: &Path, data: &Path, out: &Path, extra: Vec<String>| {
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        train(pipe, data, out, &refs)
    };
    let weights = |out: &Path| std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();

    // Gradient checkpointing on for step 1, off for step 2: the uninterrupted training.
    let straight = dir.join("straight");
    let err = ok(&train(&pipe, &data, &straight, with_cache(&["--gradient-checkpointing"])));
    assert!(err.contains("no validation images (no --validation-image)"), "{err}");
    let out = dir.join("out");
    ok(&train(&pipe, &data, &out, with_cache(&["--gradient-checkpointing", "--max-train-steps", "1"])));
    ok(&train(&pipe, &data, &out, with_cache(&["--resume-from-checkpoint", "latest"])));
    assert!(weights(&straight) == weights(&out), "switching gradient checkpointing changed the training");

    // A run with another text encoder on the same cache: it remakes the cache for itself, and
    // the first run's resume remakes its own (the same bytes again), never the other's.
    let other = other_text_encoder(&pipe, &dir.join("other-pipeline"));
    let err = ok(&train(&other, &data, &dir.join("out-other"), with_cache(&["--max-train-steps", "1"])));
    assert!(err.contains("cached 3 latents"), "{err}");
    let ckpt1 = out.join("checkpoint-1");
    let err = ok(&train(&pipe, &data, &out, with_cache(&["--resume-from-checkpoint", s(&ckpt1)])));
    assert!(err.contains("cached 3 latents"), "the cache is remade from this run's encoders:\n{err}");
    assert!(weights(&straight) == weights(&out));

    // While a run uses the cache (its shared lock, held here), a run made from other inputs
    // is refused; one made from the same inputs shares it.
    let lock = std::fs::File::open(cache.join(".lisa-cache.lock")).unwrap();
    lock.lock_shared().unwrap();
    fails_with(
        &train(&other, &data, &dir.join("out-busy"), with_cache(&["--max-train-steps", "1"])),
        "in use by another lisa run made from other inputs",
    );
    let err = ok(&train(&pipe, &data, &dir.join("out-shared"), with_cache(&["--max-train-steps", "1"])));
    assert!(err.contains("using the cached latents"), "{err}");
    lock.unlock().unwrap();

    // An edited cached embedding (its cache key kept) is caught by the resume: the model
    // records the embeddings' digest, not their path.
    let embeds = cache.join("prompt_embeds.safetensors");
    let original = std::fs::read(&embeds).unwrap();
    let mut edited = original.clone();
    let last = edited.len() - 1;
    edited[last] ^= 1;
    std::fs::write(&embeds, &edited).unwrap();
    fails_with(
        &train(&pipe, &data, &out, with_cache(&["--resume-from-checkpoint", s(&ckpt1)])),
        "text_embeddings_sha256",
    );
    std::fs::write(&embeds, &original).unwrap();

    // The ControlNet export inside a checkpoint is covered by its digests.
    let export = ckpt1.join("controlnet/diffusion_pytorch_model.safetensors");
    let good = std::fs::read(&export).unwrap();
    let mut bad = good.clone();
    bad[last.min(good.len() - 1)] ^= 1;
    std::fs::write(&export, &bad).unwrap();
    fails_with(
        &train(&pipe, &data, &out, with_cache(&["--resume-from-checkpoint", s(&ckpt1)])),
        "controlnet/diffusion_pytorch_model.safetensors",
    );
    std::fs::write(&export, &good).unwrap();

    // A cache folder inside the data folder is refused, and nothing is written there.
    let inside = data.join("cache");
    fails_with(
        &train(&pipe, &data, &dir.join("out-inside"), vec!["--cache-dir".into(), s(&inside).into()]),
        "is inside the data folder",
    );
    assert!(!inside.exists());
}

/// Sizes and shapes are checked before anything is allocated or encoded: the resolution
/// against the VAE's and the UNet's downscale and lisa's limit, the config's widths, the
/// text encoder's width against the UNet's cross-attention, the ControlNet folder's
/// existence. Nothing is cached for a refused run.
#[test]
fn sd_sizes_and_shapes_are_checked_before_encoding() {
    let dir = workdir("sizes");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let refused = |extra: &[&str], needle: &str| {
        let out = dir.join("out");
        fails_with(&train(&pipe, &data, &out, extra), needle);
        assert!(!out.join("cache").exists(), "nothing encoded for {extra:?}");
    };
    refused(&["--resolution", "100000"], "--resolution: 100000 px is more than lisa trains at");
    refused(&["--resolution", "48"], "--resolution: 48 px: latent side 6 must be a positive multiple of 4");
    refused(&["--controlnet-model-name-or-path", "no-such-controlnet"], "no-such-controlnet: no such folder");
    let config = std::fs::read_to_string(pipe.join("unet/config.json")).unwrap();
    let mut unet: serde_json::Value = serde_json::from_str(&config).unwrap();
    unet["block_out_channels"] = serde_json::json!([32, 1_000_000_000, 32]);
    std::fs::write(pipe.join("unet/config.json"), unet.to_string()).unwrap();
    refused(&[], "lisa supports at most 16384");
    unet["block_out_channels"] = serde_json::json!([16, 16, 16]);
    unet["cross_attention_dim"] = serde_json::json!(48);
    std::fs::write(pipe.join("unet/config.json"), unet.to_string()).unwrap();
    refused(&[], "the text encoder's hidden_size 32 is not the UNet's cross_attention_dim 48");
    std::fs::write(pipe.join("unet/config.json"), &config).unwrap();
    // A UNet config error names its file.
    unet = serde_json::from_str(&config).unwrap();
    unet["norm_num_groups"] = serde_json::json!(5);
    std::fs::write(pipe.join("unet/config.json"), unet.to_string()).unwrap();
    refused(&[], "unet/config.json: block_out_channels[0]");
    std::fs::write(pipe.join("unet/config.json"), &config).unwrap();
}

/// Messages point at the culprit: the scheduler's file (not the validation sampler), the
/// folder (not "checkpoint"), the OS error once, the tokenizer and text encoder that are not
/// a pair, a long prompt quoted short; `eval` and `sample` say what they run.
#[test]
fn sd_messages_name_the_culprit() {
    let dir = workdir("messages");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let out = dir.join("out");
    let fails = |pipe: &Path, needle: &str| -> String {
        let run = train(pipe, &data, &out, &[]);
        fails_with(&run, needle);
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    // A scheduler the core refuses: its file is named, not [validation.sampling].
    std::fs::write(pipe.join("scheduler/scheduler_config.json"), SCHEDULER.replace("0.012", "2.0")).unwrap();
    let err = fails(&pipe, "scheduler/scheduler_config.json");
    assert!(!err.contains("validation.sampling") && !err.contains("checkpoint"), "{err}");
    std::fs::write(pipe.join("scheduler/scheduler_config.json"), SCHEDULER).unwrap();
    // A truncated weights file of a pipeline is not called a checkpoint.
    let w = std::fs::read(pipe.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(pipe.join("unet/diffusion_pytorch_model.safetensors"), &w[..w.len() / 2]).unwrap();
    let err = fails(&pipe, "unet/diffusion_pytorch_model.safetensors");
    assert!(!err.contains("checkpoint"), "{err}");
    std::fs::write(pipe.join("unet/diffusion_pytorch_model.safetensors"), &w).unwrap();
    // A tokenizer whose ids the text encoder cannot embed: both named, before encoding.
    let te = pipe.join("text_encoder/config.json");
    let config = std::fs::read_to_string(&te).unwrap();
    let mut smaller: serde_json::Value = serde_json::from_str(&config).unwrap();
    smaller["vocab_size"] = serde_json::json!(100);
    std::fs::write(&te, smaller.to_string()).unwrap();
    let err = fails(&pipe, "embeds only 100 (vocab_size)");
    assert!(err.contains("tokenizer") && err.contains("text_encoder/config.json"), "{err}");
    assert!(!out.join("cache").exists(), "nothing encoded");
    std::fs::write(&te, config).unwrap();
    // An OS error is said once.
    let err = String::from_utf8_lossy(
        &lisa(&["train", "--main", s(&dir.join("missing.safetensors")), "--output-dir", s(&out)]).stderr,
    )
    .into_owned();
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    // A very long prompt is quoted short in the truncation warning.
    let list = std::fs::read_to_string(data.join("prompt.json")).unwrap();
    let long = "a red circle ".repeat(200);
    std::fs::write(data.join("prompt.json"), list.replace("a green ring", long.trim())).unwrap();
    let err = ok(&train(&pipe, &data, &dir.join("out-long"), &["--max-train-steps", "1"]));
    let warning = err.lines().find(|l| l.contains("was truncated")).expect("the truncation warning");
    assert!(warning.len() < 300 && warning.contains("(2599 characters)"), "{warning}");
    std::fs::write(data.join("prompt.json"), list).unwrap();
    // eval and sample say what they run when given a pipeline or an SD checkpoint.
    ok(&train(&pipe, &data, &out, &["--max-train-steps", "1"]));
    let condition = data.join("source/0.png");
    let unet = pipe.join("unet/diffusion_pytorch_model.safetensors");
    for command in [&["eval"][..], &["sample", "--condition", s(&condition), "--prompt", "red"]] {
        fails_with(&lisa(&[command, &["--main", s(&pipe)]].concat()), "run the toy model");
        fails_with(&lisa(&[command, &["--main", s(&unet)]].concat()), "is not a lisa prior");
    }
    let prior = common::tiny_prior(
        &{
            std::fs::write(dir.join("tiny.toml"), common::TINY).unwrap();
            dir.clone()
        },
        1,
        2,
    );
    let ckpt = out.join("checkpoint-1");
    fails_with(&lisa(&["eval", "--main", s(&prior), "--checkpoint", s(&ckpt)]), "of the sd architecture");
}

/// The `loss` of every row of a run's metrics.jsonl.
fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn assert_same_losses(alone: &Path, ranks: &Path) {
    let (a, b) = (losses(alone), losses(ranks));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!(lisa_core::tolerance::DATA_PARALLEL_LOSS_F32.accepts(*y, *x), "{b:?} on ranks vs {a:?} alone");
    }
}

#[test]
fn sd_ranks_train_as_one_rank_with_the_global_batch() {
    let dir = workdir("ranks");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    let common = |out: &Path, batch: &'static str| -> Vec<String> {
        [
            "train",
            "--pretrained-model-name-or-path",
            s(&pipe),
            "--train-data-dir",
            s(&data),
            "--max-train-steps",
            "2",
            "--train-batch-size",
            batch,
            "--cache-dir",
            s(&dir.join("cache")),
            "--output-dir",
            s(out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run = |args: &[String]| lisa(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // Two processes that start together encode the shared cache once between them.
    let procs = dir.join("procs");
    let port = free_port();
    let args = common(&procs, "1");
    for o in wait_all(vec![launched_as("torchrun", &args, 0, 2, port), launched_as("torchrun", &args, 1, 2, port)]) {
        ok(&o);
    }
    let alone = dir.join("alone");
    let err = ok(&run(&common(&alone, "2")));
    assert!(err.contains("using the cached latents"), "{err}");
    assert_same_losses(&alone, &procs);
    // Two ranks in one process: rank 1's model is rank 0's, copied (text embeddings included).
    let threads = dir.join("threads");
    ok(&run(&[common(&threads, "1"), vec!["--gpus".into(), "2".into()]].concat()));
    assert_same_losses(&alone, &threads);
    assert!(threads.join("controlnet/config.json").is_file());
    // Under autocast, the copies keep the frozen UNet's half-precision storage.
    let bf16 = dir.join("bf16");
    let extra: Vec<String> = ["--gpus", "2", "--mixed-precision", "bf16"].iter().map(|a| a.to_string()).collect();
    ok(&run(&[common(&bf16, "1"), extra].concat()));
    assert!(losses(&bf16).iter().all(|l| l.is_finite()));
}

/// The README's multi-GPU commands, as written, on the CPU backend and the tiny full pipeline:
/// `--gpus 8` as `--gpus 2`, torchrun's and srun's processes as two processes with the
/// variables each launcher sets (`--backend cuda`, the folders and the step count swapped for
/// the test's; the port a free one, so that parallel tests cannot collide).
#[test]
fn the_readme_multi_gpu_commands_run_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme.split("### More than one GPU").nth(1).expect("the README's multi-GPU section");
    let block = section.split("```").nth(1).expect("its command block").replace("\\\n", " ");
    let lines: Vec<&str> = block.lines().filter(|l| l.contains("lisa train")).collect();
    assert_eq!(lines.len(), 3, "--gpus, torchrun and srun: {lines:?}");
    let dir = workdir("readme-gpus");
    let (pipe, data) = (full_pipeline(&dir), images_only(&dir));
    for (i, line) in lines.iter().enumerate() {
        let launcher = line.split_whitespace().next().unwrap();
        let words: Vec<&str> = line.split("lisa train").nth(1).unwrap().split_whitespace().collect();
        let out = dir.join(format!("out-{i}"));
        let mut args = vec!["train".to_string()];
        let mut k = 0;
        while k < words.len() {
            match words[k] {
                "--backend" => k += 1, // cuda: the CPU here
                "PIPELINE" => args.push(s(&pipe).into()),
                "DATA" => args.push(s(&data).into()),
                w if w.starts_with("runs/") => args.push(s(&out).into()),
                "10000" => args.push("2".into()),
                "8" if words[k - 1] == "--gpus" => args.push("2".into()),
                w => args.push(w.to_string()),
            }
            k += 1;
        }
        let outputs: Vec<std::process::Output> = match launcher {
            "lisa" => vec![lisa(&args.iter().map(String::as_str).collect::<Vec<_>>())],
            launcher => {
                let port = free_port();
                wait_all((0..2).map(|r| launched_as(launcher, &args, r, 2, port)).collect())
            }
        };
        for o in &outputs {
            ok(o);
        }
        assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count(), 2, "{line}");
        assert!(out.join("controlnet/diffusion_pytorch_model.safetensors").is_file());
    }
}

/// SDXL end to end from a pipeline folder: both text encoders' embeddings and the pooled
/// ones cached, the crop in the time ids, hook `down_8`, validation, an exact resume, the
/// ControlNet folder with `text_time`; the VAE in f32 under fp16 (its config says
/// `force_upcast`) unless a VAE that does not is given; the bad inputs of this path.
#[test]
fn sdxl_end_to_end_from_a_full_pipeline() {
    let dir = workdir("sdxl");
    let (pipe, data) = (sdxl_pipeline(&dir), images_only(&dir));
    let out = dir.join("out");
    let cond = data.join("source/0.png");
    let extra = [
        "--hook",
        "down_8",
        "--validation-image",
        s(&cond),
        "--validation-prompt",
        "a red circle",
        "--validation-steps",
        "2",
    ];
    let err = ok(&train(&pipe, &data, &out, &extra));
    assert!(err.contains("hook down_8") && err.contains("cached 3 latents"), "{err}");
    for f in [
        "cache/prompt_embeds.safetensors",
        "cache/pooled_prompt_embeds.safetensors",
        "validation-000002.png",
        "controlnet/config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}:\n{err}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("controlnet/config.json")).unwrap()).unwrap();
    assert_eq!(config["addition_embed_type"], "text_time");
    assert_eq!(config["addition_time_embed_dim"], 4);
    assert_eq!(config["projection_class_embeddings_input_dim"], 44);
    assert_eq!(config["cross_attention_dim"], 56);
    assert!(losses(&out).iter().all(|l| l.is_finite() && *l > 0.0));
    // An exact resume, the cache reused.
    let weights = std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap();
    let ckpt = out.join("checkpoint-1");
    let err = ok(&train(&pipe, &data, &out, &[&extra[..], &["--resume-from-checkpoint", s(&ckpt)]].concat()));
    assert!(err.contains("using the cached latents"), "{err}");
    assert!(weights == std::fs::read(out.join("controlnet/diffusion_pytorch_model.safetensors")).unwrap());
    // The crop enters the time ids: the same seed, another first loss.
    let out_crop = dir.join("out-crop");
    let crop = ["--crops-coords-top-left-h", "16", "--max-train-steps", "1", "--hook", "down_8"];
    ok(&train(&pipe, &data, &out_crop, &crop));
    assert!(losses(&out_crop)[0] != losses(&out)[0], "{:?} vs {:?}", losses(&out_crop), losses(&out));
    // fp16: the VAE (force_upcast) computes in f32; a VAE given in its place that does not
    // say so computes in fp16, and is what the latents come from (its own cache).
    let fp16 = ["--mixed-precision", "fp16", "--max-train-steps", "1"];
    let err = ok(&train(&pipe, &data, &dir.join("out-fp16"), &fp16));
    assert!(err.contains("the VAE computes in f32"), "{err}");
    let vae = dir.join("fp16-fix-vae");
    copy_files(&pipe.join("vae"), &vae);
    let text = std::fs::read_to_string(vae.join("config.json")).unwrap();
    std::fs::write(vae.join("config.json"), text.replace("\"force_upcast\": true", "\"force_upcast\": false")).unwrap();
    let with_vae = [&fp16[..], &["--pretrained-vae-model-name-or-path", s(&vae)]].concat();
    let err = ok(&train(&pipe, &data, &dir.join("out-fp16-vae"), &with_vae));
    assert!(!err.contains("the VAE computes in f32") && err.contains("cached 3 latents"), "{err}");

    // Bad inputs, each before any work.
    let bad_out = dir.join("out-bad");
    fails_with(
        &train(&pipe, &data, &bad_out, &["--crops-coords-top-left-w", "64"]),
        "--crops-coords-top-left-h/-w: [0, 64] is outside the 64 px image",
    );
    fails_with(
        &train(&pipeline(&dir), &data, &bad_out, &["--crops-coords-top-left-h", "8"]),
        "only an SDXL UNet (addition_embed_type \"text_time\") takes crop coordinates",
    );
    let missing = dir.join("no-such-vae");
    fails_with(
        &train(&pipe, &data, &bad_out, &["--pretrained-vae-model-name-or-path", s(&missing)]),
        "no such VAE folder",
    );
    std::fs::write(vae.join("config.json"), text.replace("\"latent_channels\": 4", "\"latent_channels\": 8")).unwrap();
    fails_with(
        &train(&pipe, &data, &bad_out, &["--pretrained-vae-model-name-or-path", s(&vae)]),
        "makes 8 latent channels; the UNet reads 4",
    );
    std::fs::rename(pipe.join("text_encoder_2"), dir.join("te2")).unwrap();
    fails_with(&train(&pipe, &data, &bad_out, &[]), "but it has no text_encoder_2/");
    std::fs::rename(dir.join("te2"), pipe.join("text_encoder_2")).unwrap();
    let unet = pipe.join("unet/config.json");
    let text = std::fs::read_to_string(&unet).unwrap();
    std::fs::write(
        &unet,
        text.replace("\"projection_class_embeddings_input_dim\": 44", "\"projection_class_embeddings_input_dim\": 40"),
    )
    .unwrap();
    fails_with(
        &train(&pipe, &data, &bad_out, &[]),
        "projection_class_embeddings_input_dim 40 is not text_encoder_2's projection_dim 20 + 6 × addition_time_embed_dim 4 = 44",
    );
    assert!(!bad_out.join("metrics.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
