#!/usr/bin/env python
"""Build a tiny, random, fully offline Stable Diffusion pipeline folder (diffusers layout).

    python scripts/precompute/make_tiny_pipeline.py OUT [--seed 0] [--overwrite]

OUT gets the folders a diffusers StableDiffusionPipeline has, with tiny random weights:

  unet/          UNet2DConditionModel, block_out_channels (8, 16), cross_attention_dim 32, sample_size 8
  vae/           AutoencoderKL, block_out_channels (8, 8, 16, 16) -> 3 downsamples = factor 8 like SD,
                 latent_channels 4, scaling_factor 0.18215 (written explicitly)
  text_encoder/  CLIPTextModel, hidden_size 32, 2 layers, 4 heads, max_position_embeddings 77
  tokenizer/     CLIPTokenizer built here: byte-level vocab (<|startoftext|>, <|endoftext|>, the 256
                 byte-level characters and each with "</w>") + a handful of merges, model_max_length 77
  scheduler/     DDPMScheduler, scaled_linear 0.00085..0.012, epsilon prediction (SD 1.5's betas)
  model_index.json

Nothing is downloaded. It is meant for testing precompute_sd.py and lisa's loaders, not for images.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

import diffusers
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LEN = 77

# A few BPE merges so that merging is exercised (the words of the test prompts "the circle ... and ...").
MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("c", "i"),
    ("ci", "r"),
    ("cir", "c"),
    ("circ", "l"),
    ("circl", "e</w>"),
    ("o", "n</w>"),
]


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab():
    """Same order as OpenAI CLIP's vocab: bytes, bytes + </w>, merges, then the two specials."""
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES] + [BOS, EOS]
    assert len(set(vocab_list)) == len(vocab_list), "duplicate vocab entries"
    return {tok: i for i, tok in enumerate(vocab_list)}


def build_tokenizer(out_dir):
    vocab = build_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for a, b in MERGES:
                f.write(f"{a} {b}\n")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LEN)
        tok.save_pretrained(out_dir)
        # Older transformers (slow CLIPTokenizer) need vocab.json + merges.txt; keep them next to
        # whatever save_pretrained wrote (transformers 5 writes tokenizer.json).
        for name in ("vocab.json", "merges.txt"):
            if not os.path.exists(os.path.join(out_dir, name)):
                shutil.copy(os.path.join(tmp, name), os.path.join(out_dir, name))
    tok = CLIPTokenizer.from_pretrained(out_dir)
    # Self-check: specials, padding, merges, the end-of-word suffix.
    assert tok.model_max_length == MAX_LEN, tok.model_max_length
    assert tok.bos_token_id == vocab[BOS] and tok.eos_token_id == vocab[EOS], (tok.bos_token_id, tok.eos_token_id)
    assert tok.pad_token == EOS, tok.pad_token
    ids = tok("The circle").input_ids
    expected = [vocab[BOS], vocab["the</w>"], vocab["circle</w>"], vocab[EOS]]
    assert ids == expected, (ids, expected, tok.convert_ids_to_tokens(ids))
    padded = tok("", padding="max_length", max_length=MAX_LEN, truncation=True).input_ids
    assert padded == [vocab[BOS]] + [vocab[EOS]] * (MAX_LEN - 1), padded
    return tok, vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="pipeline folder to create")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args()

    out = args.out
    if os.path.exists(out):
        if not args.overwrite:
            print(f"make_tiny_pipeline: error: {out} exists (pass --overwrite to replace it)", file=sys.stderr)
            return 1
        shutil.rmtree(out)
    os.makedirs(out)

    tok, vocab = build_tokenizer(os.path.join(out, "tokenizer"))

    torch.manual_seed(args.seed)
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=MAX_LEN,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=32,
    )
    CLIPTextModel(text_config).eval().save_pretrained(os.path.join(out, "text_encoder"))

    torch.manual_seed(args.seed + 1)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(os.path.join(out, "unet"))

    torch.manual_seed(args.seed + 2)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).save_pretrained(os.path.join(out, "vae"))

    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(os.path.join(out, "scheduler"))

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(model_index, f, indent=2)
        f.write("\n")

    print(
        f"make_tiny_pipeline: wrote {out} (vocab {len(vocab)}, text hidden 32, latent channels 4, "
        f"VAE factor 8; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
