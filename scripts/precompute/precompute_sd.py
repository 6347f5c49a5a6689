#!/usr/bin/env python
"""Precompute the VAE latents and CLIP prompt embeddings that `lisa train` reads from a data folder.

    python scripts/precompute/precompute_sd.py PIPELINE DATA --resolution R
        [--sample [--seed S]] [--batch-size N] [--overwrite] [--device auto|cpu|cuda] [--variant fp16]

PIPELINE is a diffusers Stable Diffusion pipeline folder (vae/, text_encoder/, tokenizer/ are used).
DATA is a Fill50K-layout folder: DATA/prompt.json holds one JSON object per line,
{"source": "source/0.png", "target": "target/0.png", "prompt": "..."}, paths relative to DATA.

Writes (atomically: a temporary file in DATA, then os.replace):

  DATA/latents.safetensors        one float32 tensor per distinct `target`, named by the target string
                                  exactly as written in prompt.json ("target/0.png"), shape
                                  [latent_channels, R/8, R/8]: vae.encode(x).latent_dist.mean (or one
                                  sample with --sample) * vae.config.scaling_factor, where x is the
                                  target image as RGB, shorter side resized to R (bilinear), center-cropped
                                  to R x R, scaled to [-1, 1] (diffusers' train_controlnet.py transforms).
  DATA/prompt_embeds.safetensors  one float32 tensor per distinct prompt, named by the prompt string
                                  itself, plus the empty prompt "" (the null prompt), shape [77, hidden]:
                                  text_encoder(tokenizer(p, padding="max_length",
                                  max_length=tokenizer.model_max_length, truncation=True).input_ids)[0].

Refuses (message on stderr, exit status 1) when a component folder is missing, R is not a multiple
of 8, an image listed in prompt.json cannot be read (file and line named), a line of prompt.json is
not such an object, or an output file exists and --overwrite was not given.
"""

import argparse
import hashlib
import json
import os
import sys
import time

PROG = "precompute_sd"
LATENTS_FILE = "latents.safetensors"
EMBEDS_FILE = "prompt_embeds.safetensors"
NULL_PROMPT = ""
# safetensors keeps its header's metadata under this key: a tensor with this name makes a file that
# no reader can open (safetensors.torch.save_file writes it without complaint).
RESERVED_NAME = "__metadata__"
VAE_FACTOR = 8


class Refusal(Exception):
    pass


def log(msg):
    print(f"{PROG}: {msg}", flush=True)


def warn(msg):
    print(f"{PROG}: warning: {msg}", flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("pipeline", metavar="PIPELINE", help="diffusers Stable Diffusion pipeline folder")
    ap.add_argument("data", metavar="DATA", help="Fill50K-layout data folder (with prompt.json)")
    ap.add_argument("--resolution", "-r", type=int, required=True, metavar="R",
                    help="training resolution in pixels (a multiple of 8); latents are R/8 x R/8")
    ap.add_argument("--sample", action="store_true",
                    help="store one sample of each latent distribution instead of its mean")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for --sample (each target's noise is seeded from this seed and its name, "
                         "so results do not depend on batch size or order; default 0)")
    ap.add_argument("--batch-size", type=int, default=8, metavar="N", help="images / prompts per forward pass (default 8)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ... (default auto)")
    ap.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (they are cast to float32)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------- input


def check_pipeline(pipeline):
    if not os.path.isdir(pipeline):
        raise Refusal(f"pipeline folder {pipeline!r} does not exist")
    missing = []
    for sub, marker in (("vae", "config.json"), ("text_encoder", "config.json"), ("tokenizer", None)):
        d = os.path.join(pipeline, sub)
        if not os.path.isdir(d):
            missing.append(f"{sub}/ (no folder {d})")
        elif marker and not os.path.isfile(os.path.join(d, marker)):
            missing.append(f"{sub}/{marker}")
        elif sub == "tokenizer" and not any(
            os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")
        ):
            missing.append(f"{sub}/ (no tokenizer.json, vocab.json or tokenizer_config.json in {d})")
    if missing:
        raise Refusal(f"pipeline {pipeline!r} lacks component(s): " + "; ".join(missing))


def read_examples(data):
    """Parse DATA/prompt.json; every listed image must exist and be recognisable as an image."""
    from PIL import Image

    path = os.path.join(data, "prompt.json")
    if not os.path.isfile(path):
        raise Refusal(f"{path} does not exist (DATA must be a Fill50K-layout folder)")
    examples = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise Refusal(f"{where}: not valid JSON ({e})")
            if not isinstance(obj, dict):
                raise Refusal(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("source", "target", "prompt"):
                if not isinstance(obj.get(key), str):
                    raise Refusal(f"{where}: field {key!r} missing or not a string")
            for key in ("target", "prompt"):
                if obj[key] == RESERVED_NAME:
                    raise Refusal(f"{where}: {key} {RESERVED_NAME!r} cannot name a safetensors tensor")
            for key in ("source", "target"):
                rel = obj[key]
                full = os.path.join(data, rel)
                try:
                    with Image.open(full) as im:
                        im.size  # header only; the pixels of targets are decoded later
                except Exception as e:  # noqa: BLE001 - any reason the image cannot be opened
                    raise Refusal(f"{where}: cannot read {key} image {rel!r} ({full}): {e}")
            examples.append(dict(line=lineno, source=obj["source"], target=obj["target"], prompt=obj["prompt"]))
    if not examples:
        raise Refusal(f"{path} lists no examples")
    return examples


def load_target(data, ex, resolution):
    """train_controlnet.py's image transforms, written with PIL (torchvision is not needed):
    Resize(R, BILINEAR) -> CenterCrop(R) -> ToTensor() -> Normalize([0.5], [0.5]); returns [3, R, R]."""
    import numpy as np
    import torch
    from PIL import Image

    full = os.path.join(data, ex["target"])
    try:
        with Image.open(full) as im:
            im = im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"{os.path.join(data, 'prompt.json')} line {ex['line']}: cannot read target image "
                      f"{ex['target']!r} ({full}): {e}")
    w, h = im.size
    # torchvision.transforms.functional._compute_resized_output_size for an int size.
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resolution, int(resolution * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    # torchvision.transforms.functional.center_crop.
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.float32) / 255.0  # [R, R, 3]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return (x - 0.5) / 0.5


def shorten(text, n=160):
    return text if len(text) <= n else text[: n - 3] + "..."


def target_seed(seed, name):
    digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- main


def run(args):
    t0 = time.time()
    if args.resolution <= 0 or args.resolution % VAE_FACTOR != 0:
        raise Refusal(f"--resolution {args.resolution} is not a positive multiple of {VAE_FACTOR}")
    if args.batch_size <= 0:
        raise Refusal(f"--batch-size {args.batch_size} must be positive")
    check_pipeline(args.pipeline)
    if not os.path.isdir(args.data):
        raise Refusal(f"data folder {args.data!r} does not exist")
    out_latents = os.path.join(args.data, LATENTS_FILE)
    out_embeds = os.path.join(args.data, EMBEDS_FILE)
    existing = [p for p in (out_latents, out_embeds) if os.path.exists(p)]
    if existing and not args.overwrite:
        raise Refusal(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                      "pass --overwrite to replace")

    examples = read_examples(args.data)

    import torch
    import diffusers
    import transformers
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    transformers.logging.set_verbosity_error()  # we report truncation ourselves, per prompt
    transformers.logging.disable_progress_bar()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise Refusal(f"--device {args.device}: CUDA is not available")
    if device.type == "cuda":  # plain float32 (no TF32), as on the CPU
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    # ------------------------------------------------------------------ models
    kw = dict(variant=args.variant) if args.variant else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.pipeline, subfolder="tokenizer")
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"cannot load the tokenizer from {os.path.join(args.pipeline, 'tokenizer')}: {e}")
    try:
        # Loaded in the checkpoint's dtype (transformers 5 defaults to dtype="auto"; the keyword is
        # spelled differently across versions) and cast to float32 below.
        text_encoder = CLIPTextModel.from_pretrained(args.pipeline, subfolder="text_encoder", **kw)
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"cannot load the text encoder from {os.path.join(args.pipeline, 'text_encoder')}: {e}")
    try:
        vae = AutoencoderKL.from_pretrained(args.pipeline, subfolder="vae", torch_dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001
        raise Refusal(f"cannot load the VAE from {os.path.join(args.pipeline, 'vae')}: {e}")
    text_encoder = text_encoder.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    vae = vae.to(device=device).eval().requires_grad_(False)  # float32 already (torch_dtype above)

    max_len = tokenizer.model_max_length
    positions = text_encoder.config.max_position_embeddings
    if not isinstance(max_len, int) or max_len <= 0 or max_len > positions:
        raise Refusal(f"tokenizer model_max_length {max_len} is not usable with the text encoder's "
                      f"{positions} positions (set model_max_length in tokenizer/tokenizer_config.json)")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != VAE_FACTOR:
        raise Refusal(f"the VAE downsamples by {factor} (block_out_channels {list(vae.config.block_out_channels)}), "
                      f"lisa expects Stable Diffusion's {VAE_FACTOR}")
    scaling = float(vae.config.scaling_factor)
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if getattr(vae.config, key, None) not in (None, 0, 0.0):
            warn(f"vae config sets {key}={getattr(vae.config, key)!r}; ignored, latents are only multiplied "
                 f"by scaling_factor {scaling} as in train_controlnet.py")
    latent_channels = int(vae.config.latent_channels)
    hidden = int(text_encoder.config.hidden_size)
    unet_cfg = os.path.join(args.pipeline, "unet", "config.json")
    if os.path.isfile(unet_cfg):
        with open(unet_cfg) as f:
            u = json.load(f)
        if u.get("in_channels") not in (None, latent_channels):
            warn(f"unet in_channels {u.get('in_channels')} != vae latent_channels {latent_channels}")
        if u.get("cross_attention_dim") not in (None, hidden):
            warn(f"unet cross_attention_dim {u.get('cross_attention_dim')} != text encoder hidden_size {hidden}")

    # ------------------------------------------------------------------ prompts
    first_line = {}
    for ex in examples:
        first_line.setdefault(ex["prompt"], ex["line"])
    prompts = list(first_line)
    null_listed = NULL_PROMPT in first_line
    if not null_listed:
        prompts.append(NULL_PROMPT)
    truncated = 0
    for p in prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > max_len:
            truncated += 1
            kept = tokenizer.decode(tokenizer(p, truncation=True, max_length=max_len).input_ids, skip_special_tokens=True)
            warn(f"prompt.json line {first_line[p]}: prompt is {n} tokens, truncated to {max_len} "
                 f"(kept: {kept!r}); prompt: {shorten(p)!r}")
    embeds = {}
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i : i + args.batch_size]
            ids = tokenizer(batch, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids
            out = text_encoder(ids.to(device))[0].float().cpu()
            for p, e in zip(batch, out):
                embeds[p] = e.clone().contiguous()
    log(f"encoded {len(prompts)} prompt(s) -> [{max_len}, {hidden}] ({truncated} truncated)")

    # ------------------------------------------------------------------ latents
    targets = []
    seen = {}
    for ex in examples:
        if ex["target"] not in seen:
            seen[ex["target"]] = ex
            targets.append(ex)
    side = args.resolution // VAE_FACTOR
    latents = {}
    nb = (len(targets) + args.batch_size - 1) // args.batch_size
    report_every = max(1, nb // 10)
    with torch.no_grad():
        for bi, i in enumerate(range(0, len(targets), args.batch_size)):
            batch = targets[i : i + args.batch_size]
            x = torch.stack([load_target(args.data, ex, args.resolution) for ex in batch]).to(device)
            dist = vae.encode(x).latent_dist
            if args.sample:
                eps = torch.stack([
                    torch.randn(dist.mean.shape[1:], generator=torch.Generator("cpu").manual_seed(target_seed(args.seed, ex["target"])))
                    for ex in batch
                ]).to(device)
                z = dist.mean + dist.std * eps
            else:
                z = dist.mean
            z = (z * scaling).float().cpu()
            if tuple(z.shape[1:]) != (latent_channels, side, side):
                raise Refusal(f"VAE produced latents of shape {list(z.shape[1:])}, expected {[latent_channels, side, side]}")
            for ex, t in zip(batch, z):
                latents[ex["target"]] = t.clone().contiguous()
            if (bi + 1) % report_every == 0 or bi + 1 == nb:
                log(f"latents: {len(latents)}/{len(targets)} ({time.time() - t0:.1f} s)")

    # ------------------------------------------------------------------ write
    common = {
        "format": "pt",
        "producer": "lisa scripts/precompute/precompute_sd.py",
        "pipeline": os.path.abspath(args.pipeline),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    meta_latents = dict(
        common,
        kind="latents",
        resolution=str(args.resolution),
        scaling_factor=repr(scaling),
        latent_channels=str(latent_channels),
        mode="sample" if args.sample else "mean",
        **({"seed": str(args.seed)} if args.sample else {}),
    )
    meta_embeds = dict(common, kind="prompt_embeds", model_max_length=str(max_len), hidden_size=str(hidden))
    for path, tensors, meta in ((out_embeds, embeds, meta_embeds), (out_latents, latents, meta_latents)):
        if os.path.exists(path) and not args.overwrite:  # appeared while we were computing
            raise Refusal(f"{path} appeared meanwhile; pass --overwrite to replace")
        tmp = os.path.join(args.data, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    dt = time.time() - t0
    dup = len(examples) - len(targets)
    log(
        "done: {} example(s){}, {} distinct prompt(s) (+ null prompt \"\"{}), {} truncated; "
        "latents [{}, {}, {}] ({}, scaling_factor {}) -> {}; prompt embeds [{}, {}] -> {}; device {}; {:.1f} s".format(
            len(examples),
            f" ({len(targets)} distinct targets)" if dup else "",
            len(first_line),
            ", also listed" if null_listed else "",
            truncated,
            latent_channels, side, side,
            f"sample, seed {args.seed}" if args.sample else "mean",
            scaling,
            out_latents,
            max_len, hidden,
            out_embeds,
            device,
            dt,
        )
    )


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except Refusal as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
