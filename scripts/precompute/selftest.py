#!/usr/bin/env python
"""End-to-end check of precompute_sd.py on a tiny offline pipeline and a tiny Fill50K folder.

    python scripts/precompute/selftest.py [WORKDIR]      (default: a fresh temporary folder, removed after)

Builds WORKDIR/tiny_sd with make_tiny_pipeline.py, WORKDIR/data with 4 examples (64x64, 96x64 and
80x128 PNGs; a repeated prompt, a unicode/punctuation prompt, a prompt the tokenizer truncates), runs
precompute_sd.py and checks names, shapes, metadata, that the embeddings and latents equal direct
text_encoder / vae calls, batch-size invariance, --sample reproducibility, and every refusal.
Exits non-zero on the first failed check.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
LONG_PROMPT = "the circle " + " ".join(f"word{i}" for i in range(100))
ROWS = [  # prompt, target (w, h)
    ("pale golden rod circle with old lace background", (64, 64)),
    ("Crème brûlée “circle” — on a naïve café background!? 🎨 100% (ok) #1\ttab  spaces", (96, 64)),
    (LONG_PROMPT, (80, 128)),
    ("pale golden rod circle with old lace background", (64, 64)),
]
R = 64


def check(cond, what):
    if not cond:
        print(f"selftest: FAILED: {what}", flush=True)
        sys.exit(1)
    print(f"selftest: ok: {what}", flush=True)


def run(*args):
    p = subprocess.run([PY, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def precompute(pipeline, data, *extra):
    return run(os.path.join(HERE, "precompute_sd.py"), pipeline, data, *extra)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_data(d):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(d, "source"))
    os.makedirs(os.path.join(d, "target"))
    with open(os.path.join(d, "prompt.json"), "w", encoding="utf-8") as f:
        for i, (prompt, (w, h)) in enumerate(ROWS):
            for kind in ("source", "target"):
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(d, kind, f"{i}.png"))
            f.write(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": prompt}) + "\n")


def expected_pixels(path):
    """train_controlnet.py's transforms for this test's three sizes, spelled out case by case."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    a = np.asarray(im, dtype=np.float32)
    if (w, h) == (64, 64):
        pass
    elif (w, h) == (96, 64):  # no resize; crop columns 16..80
        a = a[:, 16:80]
    elif (w, h) == (80, 128):  # resize to 64 x int(64 * 128 / 80) = 64 x 102, crop rows round(19) = 19..83
        a = np.asarray(im.resize((64, 102), Image.BILINEAR), dtype=np.float32)[19:83]
    else:
        raise AssertionError((w, h))
    return torch.from_numpy(a.copy()).permute(2, 0, 1) / 255.0 * 2.0 - 1.0


def main():
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lisa-precompute-")
    cleanup = len(sys.argv) <= 1
    os.makedirs(work, exist_ok=True)
    pipe = os.path.join(work, "tiny_sd")
    data = os.path.join(work, "data")
    for p in (pipe, data):
        if os.path.exists(p):
            shutil.rmtree(p)
    try:
        rc, out, err = run(os.path.join(HERE, "make_tiny_pipeline.py"), pipe)
        check(rc == 0, f"make_tiny_pipeline.py {pipe}: {out.strip()} {err.strip()[-300:] if rc else ''}")

        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from safetensors import safe_open
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTokenizer

        sd = StableDiffusionPipeline.from_pretrained(pipe, safety_checker=None, feature_extractor=None)
        img = sd("the circle", num_inference_steps=2, height=R, width=R, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
        check(img.shape == (1, R, R, 3) and np.isfinite(img).all(),
              f"StableDiffusionPipeline loads the tiny folder and generates {img.shape}")

        make_data(data)
        latents_path = os.path.join(data, "latents.safetensors")
        embeds_path = os.path.join(data, "prompt_embeds.safetensors")

        # ---------------------------------------------------------------- the run
        rc, out, err = precompute(pipe, data, "--resolution", str(R), "--batch-size", "3")
        print(out + err)
        check(rc == 0, "precompute_sd.py exits 0")
        warnings = [l for l in out.splitlines() if "truncated to" in l]
        check(len(warnings) == 1 and "line 3:" in warnings[0], "exactly one truncation warning, naming line 3")
        check("done: 4 example(s), 3 distinct prompt(s)" in out, "summary counts examples and distinct prompts")
        check(not [f for f in os.listdir(data) if ".tmp-" in f], "no temporary files left in DATA")

        lat = load_file(latents_path)
        emb = load_file(embeds_path)
        targets = [f"target/{i}.png" for i in range(len(ROWS))]
        prompts = sorted({p for p, _ in ROWS} | {""})
        check(sorted(lat) == sorted(targets), f"latent names are the target strings: {sorted(lat)}")
        check(sorted(emb) == prompts, "embedding names are the distinct prompts plus \"\"")
        check(all(t.dtype == torch.float32 and tuple(t.shape) == (4, R // 8, R // 8) for t in lat.values()),
              "latents are float32 [4, 8, 8]")
        check(all(t.dtype == torch.float32 and tuple(t.shape) == (77, 32) for t in emb.values()),
              "prompt embeds are float32 [77, 32]")
        with safe_open(latents_path, "pt") as f:
            meta = f.metadata()
        check(meta.get("mode") == "mean" and meta.get("scaling_factor") == "0.18215" and meta.get("resolution") == "64",
              f"latents metadata {dict((k, meta[k]) for k in ('kind', 'mode', 'resolution', 'scaling_factor'))}")

        tok = CLIPTokenizer.from_pretrained(pipe, subfolder="tokenizer")
        te = CLIPTextModel.from_pretrained(pipe, subfolder="text_encoder").eval()
        worst = 0.0
        with torch.no_grad():
            for p in prompts:
                ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
                if p == LONG_PROMPT:
                    check(ids.shape == (1, 77) and len(tok(p).input_ids) > 77, "the long prompt is cut to 77 ids")
                worst = max(worst, (te(ids)[0][0] - emb[p]).abs().max().item())
        check(worst <= 1e-5, f"embeddings equal a direct text_encoder call (max abs diff {worst:.2e})")
        with torch.no_grad():
            null = te(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0][0]
        check(torch.equal(null, emb[""]) or (null - emb[""]).abs().max().item() <= 1e-6, "\"\" is the null prompt")

        vae = AutoencoderKL.from_pretrained(pipe, subfolder="vae").eval()
        sf = vae.config.scaling_factor
        worst = 0.0
        with torch.no_grad():
            for t in targets:
                x = expected_pixels(os.path.join(data, t))[None]
                worst = max(worst, (vae.encode(x).latent_dist.mean[0] * sf - lat[t]).abs().max().item())
        check(worst <= 1e-5, f"latents equal vae.encode(x).latent_dist.mean * scaling_factor, with resize + center crop (max abs diff {worst:.2e})")
        check(torch.equal(lat["target/0.png"], lat["target/0.png"]) and not torch.equal(lat["target/0.png"], lat["target/3.png"]),
              "distinct images give distinct latents")

        # ---------------------------------------------------------------- refusal to overwrite
        before = (sha(latents_path), sha(embeds_path))
        rc, out, err = precompute(pipe, data, "--resolution", str(R))
        check(rc == 1 and "--overwrite" in err and (sha(latents_path), sha(embeds_path)) == before,
              f"re-run without --overwrite refuses, files unchanged: {err.strip()}")

        # ---------------------------------------------------------------- batch-size invariance
        rc, out, err = precompute(pipe, data, "--resolution", str(R), "--batch-size", "1", "--overwrite")
        lat1, emb1 = load_file(latents_path), load_file(embeds_path)
        dl = max((lat1[k] - lat[k]).abs().max().item() for k in lat)
        de = max((emb1[k] - emb[k]).abs().max().item() for k in emb)
        check(rc == 0 and dl <= 1e-5 and de <= 1e-5, f"--batch-size 1 --overwrite gives the same tensors (latents {dl:.1e}, embeds {de:.1e})")

        # ---------------------------------------------------------------- --sample
        rc, out, err = precompute(pipe, data, "--resolution", str(R), "--sample", "--overwrite", "--batch-size", "4")
        s1 = load_file(latents_path)
        rc2, _, _ = precompute(pipe, data, "--resolution", str(R), "--sample", "--overwrite", "--batch-size", "1")
        s2 = load_file(latents_path)
        ds = max((s1[k] - s2[k]).abs().max().item() for k in s1)
        check(rc == 0 and rc2 == 0 and ds <= 1e-5, f"--sample is reproducible across batch sizes (max diff {ds:.1e})")
        check(all(not torch.allclose(s1[k], lat[k]) for k in lat), "--sample differs from the mean")
        with safe_open(latents_path, "pt") as f:
            check(f.metadata().get("mode") == "sample" and f.metadata().get("seed") == "0", "sample metadata names mode and seed")

        # ---------------------------------------------------------------- refusals
        rc, out, err = precompute(pipe, data, "--resolution", "60", "--overwrite")
        check(rc == 1 and "multiple of 8" in err, f"R=60 refused: {err.strip()}")

        bad_pipe = os.path.join(work, "no_vae")
        shutil.copytree(pipe, bad_pipe)
        shutil.rmtree(os.path.join(bad_pipe, "vae"))
        shutil.rmtree(os.path.join(bad_pipe, "tokenizer"))
        rc, out, err = precompute(bad_pipe, data, "--resolution", str(R), "--overwrite")
        check(rc == 1 and "vae/" in err and "tokenizer/" in err, f"missing components refused: {err.strip()}")

        bad_data = os.path.join(work, "bad_data")
        shutil.copytree(data, bad_data)
        for f in ("latents.safetensors", "prompt_embeds.safetensors"):
            os.remove(os.path.join(bad_data, f))
        with open(os.path.join(bad_data, "target", "1.png"), "wb") as f:
            f.write(b"not a png at all")
        rc, out, err = precompute(pipe, bad_data, "--resolution", str(R))
        check(rc == 1 and "line 2" in err and "target/1.png" in err, f"unreadable image refused: {err.strip()}")

        truncated_png = os.path.join(bad_data, "target", "1.png")
        with open(os.path.join(data, "target", "1.png"), "rb") as f:
            blob = f.read()
        with open(truncated_png, "wb") as f:
            f.write(blob[: len(blob) // 2])  # a valid header, pixels cut off: fails only when decoded
        rc, out, err = precompute(pipe, bad_data, "--resolution", str(R))
        check(rc == 1 and "line 2" in err and "target/1.png" in err, f"truncated image refused: {err.strip()}")
        check(not os.path.exists(os.path.join(bad_data, "latents.safetensors"))
              and not [f for f in os.listdir(bad_data) if ".tmp-" in f], "nothing written after a refusal")
        shutil.copy(os.path.join(data, "target", "1.png"), truncated_png)

        os.remove(os.path.join(bad_data, "source", "2.png"))
        rc, out, err = precompute(pipe, bad_data, "--resolution", str(R))
        check(rc == 1 and "line 3" in err and "source/2.png" in err, f"missing source image refused: {err.strip()}")
        shutil.copy(os.path.join(data, "source", "2.png"), os.path.join(bad_data, "source", "2.png"))

        with open(os.path.join(bad_data, "prompt.json"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"source": "source/0.png", "target": "target/0.png", "prompt": "__metadata__"}) + "\n")
        rc, out, err = precompute(pipe, bad_data, "--resolution", str(R))
        check(rc == 1 and "line 5" in err and "__metadata__" in err, f"prompt '__metadata__' refused: {err.strip()}")

        print("selftest: all checks passed", flush=True)
    finally:
        if cleanup:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
