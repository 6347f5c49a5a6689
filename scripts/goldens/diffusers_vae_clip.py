#!/usr/bin/env python
"""Golden fixtures for lisa's diffusers AutoencoderKL, transformers CLIPTextModel and CLIP BPE tokenizer.

Writes (see scripts/goldens/README.md, section "VAE, CLIP text encoder and tokenizer"):

  trainer/tests/fixtures/vae/
      config.json, diffusion_pytorch_model.safetensors   tiny AutoencoderKL (save_pretrained)
      legacy/config.json, legacy/diffusion_pytorch_model.safetensors
                                                         the same weights, mid-block attention under the
                                                         old names (query/key/value/proj_attn) diffusers
                                                         still converts on load
      io.safetensors                                     encode/decode inputs, outputs, intermediates
  trainer/tests/fixtures/clip/
      tokenizer/            CLIPTokenizer.save_pretrained (tokenizer.json + tokenizer_config.json)
      tokenizer_nojson/     vocab.json + merges.txt + SD-1.5-style tokenizer_config.json/special_tokens_map.json
      text_encoder/         CLIPTextModel, quick_gelu, 3 layers (save_pretrained)
      text_encoder_gelu/    CLIPTextModel, gelu, 2 layers, weights renamed to the transformers-4 layout
                            of SD checkpoints (`text_model.` prefix + position_ids buffer)
      io.safetensors        input_ids of the prompts, last_hidden_state / pooled of both encoders

Everything is offline (models built from configs, a tokenizer built from a BPE learned here on a
small built-in corpus), float32, CPU, one thread, seeded. Every parameter is re-randomised before
saving. The script then reloads every saved folder with from_pretrained and checks it reproduces
the outputs, and checks the formulas documented in the README with independent plain-torch /
plain-Python reimplementations (VAE, CLIP text transformer, CLIP tokenizer).

Usage: python scripts/goldens/diffusers_vae_clip.py [--out trainer/tests/fixtures] [--only vae|clip]
"""

import argparse
import collections
import json
import math
import os
import shutil
import sys
import unicodedata

import numpy as np
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusers
import tokenizers
import transformers
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import randomise, rms, write_safetensors  # noqa: E402  (same conventions as the SD goldens)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Not bit-exact across reloads: torch's CPU kernels may round differently (~1e-6).
TOL = dict(rtol=1e-5, atol=1e-5)

# ==============================================================================================
# VAE
# ==============================================================================================

VAE_SEED = 3200
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
    act_fn="silu",
    sample_size=32,
    scaling_factor=0.18215,
)
VAE_BATCH = 2
VAE_RES = 32
# After randomisation the quant_conv biases of two logvar channels are shifted so that about half
# of those channels' raw values fall outside [-30, 20]: the clamp is exercised.
LOGVAR_SHIFTS = {4: 20.0, 5: -30.0}  # quant_conv output channel -> added to its bias
# Old (diffusers < 0.14 `AttentionBlock`) names of the mid-block attention parameters. The old
# AttentionBlock used nn.Linear, so the weights are [C, C] like the new ones (the original LDM
# checkpoints' 1x1-conv q/k/v/proj_out, [C, C, 1, 1], are a different, single-file format that
# from_pretrained does not read).
LEGACY_ATTN_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def to_legacy_names(state):
    out = {}
    for k, v in state.items():
        nk = k
        if ".mid_block.attentions." in k:
            for new, old in LEGACY_ATTN_NAMES.items():
                marker = f".{new}."
                if marker in k:
                    nk = k.replace(marker, f".{old}.")
        out[nk] = v
    return out


# --- independent plain-torch reimplementation of the formulas in the README -------------------


def _gn(x, s, p, groups, eps=1e-6):
    return F.group_norm(x, groups, s[f"{p}.weight"], s[f"{p}.bias"], eps)


def _conv(x, s, p, stride=1, padding=1):
    return F.conv2d(x, s[f"{p}.weight"], s[f"{p}.bias"], stride=stride, padding=padding)


def _lin(x, s, p):
    return F.linear(x, s[f"{p}.weight"], s[f"{p}.bias"])


def _resnet(x, s, p, g):
    h = _conv(F.silu(_gn(x, s, f"{p}.norm1", g)), s, f"{p}.conv1")
    h = _conv(F.silu(_gn(h, s, f"{p}.norm2", g)), s, f"{p}.conv2")
    if f"{p}.conv_shortcut.weight" in s:
        x = _conv(x, s, f"{p}.conv_shortcut", padding=0)
    return x + h


def _vae_attn(x, s, p, g):
    b, c, hh, ww = x.shape
    h = _gn(x, s, f"{p}.group_norm", g).reshape(b, c, hh * ww).transpose(1, 2)  # [b, hw, c]
    q, k, v = (_lin(h, s, f"{p}.{n}") for n in ("to_q", "to_k", "to_v"))
    a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)  # one head, head_dim = c
    o = _lin(a @ v, s, f"{p}.to_out.0")
    return x + o.transpose(1, 2).reshape(b, c, hh, ww)


def _mid(x, s, p, g):
    x = _resnet(x, s, f"{p}.resnets.0", g)
    x = _vae_attn(x, s, f"{p}.attentions.0", g)
    return _resnet(x, s, f"{p}.resnets.1", g)


def reference_vae(s, cfg, image, z):
    g, n = cfg["norm_num_groups"], len(cfg["block_out_channels"])
    out = {}
    x = _conv(image, s, "encoder.conv_in")
    out["encoder_conv_in"] = x
    for i in range(n):
        for j in range(cfg["layers_per_block"]):
            x = _resnet(x, s, f"encoder.down_blocks.{i}.resnets.{j}", g)
        if i < n - 1:  # asymmetric zero padding (right, bottom), then 3x3 stride-2 conv, no padding
            x = _conv(F.pad(x, (0, 1, 0, 1)), s, f"encoder.down_blocks.{i}.downsamplers.0.conv", stride=2, padding=0)
    x = _mid(x, s, "encoder.mid_block", g)
    out["encoder_mid"] = x
    x = _conv(F.silu(_gn(x, s, "encoder.conv_norm_out", g)), s, "encoder.conv_out")
    out["encoder_out"] = x
    m = _conv(x, s, "quant_conv", padding=0)
    out["moments"] = m
    c = cfg["latent_channels"]
    out["latent_mean"] = m[:, :c]
    out["latent_logvar"] = m[:, c:].clamp(-30.0, 20.0)

    y = _conv(z, s, "post_quant_conv", padding=0)
    out["decoder_post_quant"] = y
    y = _conv(y, s, "decoder.conv_in")
    out["decoder_conv_in"] = y
    y = _mid(y, s, "decoder.mid_block", g)
    out["decoder_mid"] = y
    for i in range(n):
        for j in range(cfg["layers_per_block"] + 1):
            y = _resnet(y, s, f"decoder.up_blocks.{i}.resnets.{j}", g)
        if i < n - 1:
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
            y = _conv(y, s, f"decoder.up_blocks.{i}.upsamplers.0.conv")
    out["decoded"] = _conv(F.silu(_gn(y, s, "decoder.conv_norm_out", g)), s, "decoder.conv_out")
    return out


def generate_vae(out):
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(VAE_SEED)

    vae = AutoencoderKL(**VAE_CONFIG).eval()
    randomise(vae, gen)
    with torch.no_grad():
        for ch, shift in LOGVAR_SHIFTS.items():
            vae.quant_conv.bias[ch] += shift
    vae.requires_grad_(False)
    vae.save_pretrained(out, safe_serialization=True)

    image = torch.rand(VAE_BATCH, 3, VAE_RES, VAE_RES, generator=gen) * 2.0 - 1.0
    lat = VAE_RES // 8
    z = torch.randn(VAE_BATCH, VAE_CONFIG["latent_channels"], lat, lat, generator=gen)
    sample_eps = torch.randn(VAE_BATCH, VAE_CONFIG["latent_channels"], lat, lat, generator=gen)

    captured = {}

    def grab(name):
        def hook(_m, _args, output):
            captured[name] = output.detach().clone()

        return hook

    hooks = [
        vae.encoder.conv_in.register_forward_hook(grab("encoder_conv_in")),
        vae.encoder.mid_block.register_forward_hook(grab("encoder_mid")),
        vae.encoder.register_forward_hook(grab("encoder_out")),
        vae.quant_conv.register_forward_hook(grab("moments")),
        vae.post_quant_conv.register_forward_hook(grab("decoder_post_quant")),
        vae.decoder.conv_in.register_forward_hook(grab("decoder_conv_in")),
        vae.decoder.mid_block.register_forward_hook(grab("decoder_mid")),
    ]
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        decoded = vae.decode(z).sample
    for h in hooks:
        h.remove()

    sf = VAE_CONFIG["scaling_factor"]
    io = {
        "image": image,
        "latent_mean": dist.mean,
        "latent_logvar": dist.logvar,
        "latents_scaled": dist.mean * sf,
        "sample_eps": sample_eps,
        "latent_sample": dist.mean + dist.std * sample_eps,
        "z": z,
        "decoded": decoded,
    }
    io.update(captured)
    io = {k: v.detach().to(torch.float32).contiguous() for k, v in io.items()}

    meta = {
        "scaling_factor": repr(sf),
        "seed": str(VAE_SEED),
        "config": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()}, sort_keys=True),
        "logvar_bias_shifts": json.dumps({str(k): v for k, v in LOGVAR_SHIFTS.items()}),
        "encode": "moments = quant_conv(encoder(image)); latent_mean, raw_logvar = chunk(moments, 2, dim=1); "
        "latent_logvar = clamp(raw_logvar, -30, 20); latents_scaled = latent_mean * scaling_factor",
        "latent_sample": "latent_mean + exp(0.5 * latent_logvar) * sample_eps (latent_dist.sample() with this noise)",
        "decode": "decoded = decoder(post_quant_conv(z)); z is the raw (unscaled) latent, i.e. latents_scaled / scaling_factor",
        "encoder_downsample": "Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)) (zeros on the right and bottom only), "
        "then conv 3x3 stride 2 padding 0",
        "decoder_upsample": "nearest x2 (F.interpolate mode='nearest'), then conv 3x3 padding 1",
        "norm_eps": "every GroupNorm in the VAE (resnets, attention group_norm, conv_norm_out) uses eps 1e-6",
        "mid_attention": "1 head, head_dim = C (scale C^-0.5); GroupNorm -> [B, HW, C] -> to_q/to_k/to_v (Linear, bias) "
        "-> softmax(QK^T/sqrt(C)) V -> to_out.0 -> back to [B, C, H, W] -> + input",
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "numpy_version": np.__version__,
    }
    write_safetensors(os.path.join(out, "io.safetensors"), io, meta)

    # --- legacy attention names ------------------------------------------------------------------
    from safetensors.torch import load_file

    legacy = os.path.join(out, "legacy")
    os.makedirs(legacy, exist_ok=True)
    current = load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    legacy_state = to_legacy_names(current)
    renamed = sorted(k for k in legacy_state if k not in current)
    assert len(renamed) == 16, renamed  # 2 mid blocks x 4 linears x (weight, bias)
    write_safetensors(os.path.join(legacy, "diffusion_pytorch_model.safetensors"), legacy_state, {"format": "pt"})
    shutil.copy(os.path.join(out, "config.json"), os.path.join(legacy, "config.json"))

    # --- report -----------------------------------------------------------------------------------
    print(f"== vae: {sum(p.numel() for p in vae.parameters())} params, scaling_factor {sf}")
    bad = []
    for k, v in io.items():
        print(f"   {k:<24} {str(list(v.shape)):<18} rms {rms(v):.6g}")
        if not torch.isfinite(v).all() or bool((v == 0).all()):
            bad.append(k)
    assert not bad, f"degenerate outputs: {bad}"
    raw_lv = io["moments"][:, VAE_CONFIG["latent_channels"]:]
    n_hi, n_lo = int((raw_lv > 20).sum()), int((raw_lv < -30).sum())
    print(f"   logvar clamp: {n_hi} values > 20, {n_lo} values < -30 (of {raw_lv.numel()})")
    assert n_hi > 0 and n_lo > 0, "the logvar clamp is not exercised"
    print(f"   legacy names: {', '.join(renamed[:4])}, ...")
    self_check_vae(out, legacy, io, current)


@torch.no_grad()
def self_check_vae(out, legacy, io, current):
    from safetensors.torch import load_file

    image, z = io["image"], io["z"]
    for d in (out, legacy):
        vae = AutoencoderKL.from_pretrained(d, local_files_only=True).eval()
        sd = {k: v for k, v in vae.state_dict().items()}
        assert set(sd) == set(current), set(sd) ^ set(current)
        for k in current:
            assert torch.equal(sd[k], current[k]), k
        dist = vae.encode(image).latent_dist
        torch.testing.assert_close(dist.mean, io["latent_mean"], **TOL)
        torch.testing.assert_close(dist.logvar, io["latent_logvar"], **TOL)
        torch.testing.assert_close(vae.decode(z).sample, io["decoded"], **TOL)
    # A legacy file with 1x1-conv shaped ([C, C, 1, 1]) attention weights is NOT what
    # from_pretrained accepts (documented in the README); make sure ours has the Linear shapes.
    leg = load_file(os.path.join(legacy, "diffusion_pytorch_model.safetensors"))
    assert list(leg["encoder.mid_block.attentions.0.query.weight"].shape) == [16, 16]
    # Independent reimplementation of the documented formulas.
    ref = reference_vae(current, VAE_CONFIG, image, z)
    for k, v in ref.items():
        torch.testing.assert_close(v, io[k], **TOL)
    torch.testing.assert_close(io["latents_scaled"], io["latent_mean"] * VAE_CONFIG["scaling_factor"])
    print("   self-check: current and legacy folders reload and reproduce; plain-torch reference matches")


# ==============================================================================================
# CLIP tokenizer
# ==============================================================================================

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LEN = 77
NUM_MERGES = 200
# transformers' CLIPTokenizer pre-tokenizer pattern (also OpenAI CLIP's `pat`).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# GPT-2's pattern, which tokenizers' ByteLevel pre-tokenizer (use_regex = true) applies to every piece.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The corpus the merges are learned from (English about shapes/colours/backgrounds, the words of the
# prompts, a little non-ASCII so that byte-level symbols get merged too).
CORPUS = """
a red circle on a blue background. a blue circle on a red background. the red circle and the blue square.
a green square on a white background, a black triangle on a yellow background, a white circle in the center.
the circle is red and the background is blue. the square is green and the background is white.
red circles and blue squares and green triangles on a grey background with a soft shadow.
a photo of a red circle, a photo of a blue square, a painting of a green triangle, a drawing of the circle.
a small red circle in the middle of a large blue background, a large green square at the top of the image.
an orange circle, a purple square, a pink triangle, a brown background, a dark background, a light background.
circle circle circle red red red background background background blue blue the the the and and and
the outline of a circle, the edge of the square, the corner of the triangle, the color of the background.
a high quality photo, a detailed painting, an illustration with sharp edges and smooth gradients.
it's a circle; they're squares; we've drawn the shapes; i'm sure the lines are straight; you'll see.
a café in paris, a naïve drawing, über cool colors, a café with a red door, the naïve style of the café.
"""


def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries), as in
    scripts/precompute/make_tiny_pipeline.py and OpenAI CLIP's simple_tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


BYTE_ENCODER = bytes_to_unicode()


def normalize(text):
    """The tokenizer.json normalizer: NFC, every run of whitespace -> one space, lowercase."""
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def pre_tokenize(normalized):
    """Split (CLIP pattern, keep matches, drop the rest) then ByteLevel (GPT-2 pattern inside each
    piece, bytes -> printable unicode)."""
    words = []
    for piece in regex.findall(CLIP_PATTERN, normalized):
        for sub in regex.findall(GPT2_PATTERN, piece):
            words.append("".join(BYTE_ENCODER[b] for b in sub.encode("utf-8")))
    return words


def word_symbols(word):
    syms = list(word)
    syms[-1] += "</w>"
    return syms


def learn_merges(corpus, n):
    """Plain BPE on the pre-tokenized corpus: repeatedly merge the most frequent adjacent pair
    (ties: the lexicographically smallest pair; pairs seen once count too), skipping pairs whose
    result already exists."""
    counts = collections.Counter(tuple(word_symbols(w)) for w in pre_tokenize(normalize(corpus)))
    words = dict(counts)
    known = set(BYTE_ENCODER.values()) | {c + "</w>" for c in BYTE_ENCODER.values()}
    merges = []
    while len(merges) < n:
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        best = None
        for pair, c in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
            if pair[0] + pair[1] not in known:
                best = pair
                break
        if best is None:
            break
        merges.append(best)
        known.add(best[0] + best[1])
        new_words = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_vocab(merges):
    """OpenAI CLIP's order: the 256 byte symbols, the same with '</w>', one entry per merge result
    (in merge order), then <|startoftext|>, <|endoftext|>."""
    chars = list(BYTE_ENCODER.values())
    vocab_list = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges] + [BOS, EOS]
    assert len(set(vocab_list)) == len(vocab_list), "duplicate vocab entries"
    return {tok: i for i, tok in enumerate(vocab_list)}


def reference_tokenize(text, vocab, merges):
    """Plain-Python CLIP tokenization as configured in tokenizer.json (no truncation/padding)."""
    ranks = {m: i for i, m in enumerate(merges)}
    ids = []
    # Added (special) tokens are matched first, on the raw text, case-sensitively.
    for seg in regex.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
        if seg in (BOS, EOS):
            ids.append(vocab[seg])
            continue
        for word in pre_tokenize(normalize(seg)):
            syms = word_symbols(word)
            while len(syms) > 1:
                cands = [(ranks[(a, b)], i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if (a, b) in ranks]
                if not cands:
                    break
                r, _ = min(cands)
                a, b = merges[r]
                out, i = [], 0
                while i < len(syms):
                    if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                        out.append(a + b)
                        i += 2
                    else:
                        out.append(syms[i])
                        i += 1
                syms = out
            ids.extend(vocab[s] for s in syms)
    return ids


# SD 1.5's tokenizer folder (openai/clip-vit-large-patch14's slow-tokenizer files) has no
# tokenizer.json; these are its tokenizer_config.json / special_tokens_map.json, minus the name.
def _added(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


LEGACY_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {"__type": "AddedToken", **_added(BOS)},
    "do_lower_case": True,
    "eos_token": {"__type": "AddedToken", **_added(EOS)},
    "errors": "replace",
    "model_max_length": MAX_LEN,
    "pad_token": EOS,
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {"__type": "AddedToken", **_added(EOS)},
}
LEGACY_SPECIAL_TOKENS_MAP = {"bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": EOS, "unk_token": _added(EOS)}

LONG_PROMPT = (
    "A highly detailed photo of a small red circle in the middle of a large blue background, next to a green "
    "square and a black triangle, with soft shadows, sharp edges, smooth gradients and a white outline around "
    "every shape; the circle is slightly off center, the square is rotated by 45 degrees, the triangle points "
    "up, and the whole image is lit from the top left corner by a warm orange light at sunset, in the style "
    "of a naive painting from a small cafe in Paris"
)

PROMPTS = [
    "",
    "a red circle",
    "Red  CIRCLE,   blue background!",
    "café über naïve – 東京 🙂",
    "it's 3.14 o'clock; e-mail@x.y",
    LONG_PROMPT,
    "   leading and trailing spaces\t\n ",
    BOS,
    "a <|startoftext|>red<|endoftext|> circle",
    "<|STARTOFTEXT|> and <|EndOfText|> in capitals",
    "CAFE\u0301 \u00dcBER NA\u00cfVE x\u0301 ²½ 2024",
    "they're circles, we've squared the backgrounds; I'll see",
]


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")


def build_tokenizers(out):
    merges = learn_merges(CORPUS, NUM_MERGES)
    vocab = build_vocab(merges)
    assert len(merges) == NUM_MERGES, len(merges)
    for m in merges:
        assert m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab, m

    tok_dir = os.path.join(out, "tokenizer")
    nojson_dir = os.path.join(out, "tokenizer_nojson")
    for d in (tok_dir, nojson_dir):
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LEN)
    tok.save_pretrained(tok_dir)

    # vocab.json: {token: id} in id order; merges.txt: '#version: 0.2' then 'a b' per line, rank order.
    with open(os.path.join(nojson_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(nojson_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    write_json(os.path.join(nojson_dir, "tokenizer_config.json"), LEGACY_TOKENIZER_CONFIG)
    write_json(os.path.join(nojson_dir, "special_tokens_map.json"), LEGACY_SPECIAL_TOKENS_MAP)

    tok = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    tok_nj = CLIPTokenizer.from_pretrained(nojson_dir, local_files_only=True)
    for t in (tok, tok_nj):
        assert t.model_max_length == MAX_LEN, t.model_max_length
        assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (vocab[BOS], vocab[EOS], vocab[EOS])
        assert len(t) == len(vocab), len(t)
    return tok, tok_nj, vocab, merges


# ==============================================================================================
# CLIP text encoders
# ==============================================================================================

# layout "save_pretrained": the file transformers 5 writes (names without a prefix:
#   `embeddings.token_embedding.weight`, `encoder.layers.0...`, `final_layer_norm.weight`).
# layout "transformers4": what every SD text_encoder/model.safetensors on the hub holds (written by
#   transformers 4.x): the same tensors under `text_model.`, plus the (then persistent) buffer
#   `text_model.embeddings.position_ids` (I64 [1, 77], 0..76), which a loader must ignore.
#   transformers 5 still loads it (conversion_mapping: CLIPTextModel PrefixChange "text_model").
CLIP_CASES = {
    "text_encoder": dict(
        hidden_act="quick_gelu", num_hidden_layers=3, seed=7700, key="last_hidden_state", layout="save_pretrained"
    ),
    "text_encoder_gelu": dict(
        hidden_act="gelu", num_hidden_layers=2, seed=7800, key="last_hidden_state_gelu", layout="transformers4"
    ),
}
EMBEDDING_STD = 0.5


def write_safetensors_mixed(path, tensors, metadata):
    """write_safetensors (diffusers_sd.py) for F32 and I64 tensors: keys sorted, data in key order,
    header padded with spaces to a multiple of 8, sorted metadata."""
    kinds = {torch.float32: ("F32", "<f4"), torch.int64: ("I64", "<i8")}
    header = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        dtype, np_dtype = kinds[t.dtype]
        raw = t.numpy().astype(np_dtype).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for raw in blobs:
            f.write(raw)


@torch.no_grad()
def randomise_clip(model, gen):
    """As the SD goldens (ndim >= 2: N(0, 1/fan_in); LayerNorm gammas 1 + 0.1 N; other 1-D 0.1 N),
    except nn.Embedding tables: N(0, EMBEDDING_STD^2) (token and position embeddings of a
    comparable size, so both matter after the first LayerNorm)."""
    gammas, embeddings = set(), set()
    for mname, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            gammas.add(f"{mname}.weight")
        if isinstance(m, nn.Embedding):
            embeddings.add(f"{mname}.weight")
    for name, p in model.named_parameters():
        if name in embeddings:
            p.copy_(EMBEDDING_STD * torch.randn(p.shape, generator=gen))
        elif p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(int(np.prod(p.shape[1:]))))
        elif name in gammas:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        assert name == "text_model.embeddings.position_ids" or name.endswith("embeddings.position_ids"), name


def reference_clip(s, cfg, ids):
    """Plain-torch CLIPTextModel forward (no attention mask: causal only)."""
    p = "text_model." if "text_model.embeddings.token_embedding.weight" in s else ""
    b, t = ids.shape
    d, nh = cfg.hidden_size, cfg.num_attention_heads
    hd = d // nh
    eps = cfg.layer_norm_eps
    x = s[f"{p}embeddings.token_embedding.weight"][ids] + s[f"{p}embeddings.position_embedding.weight"][:t][None]
    causal = torch.full((t, t), float("-inf")).triu(1)
    act = {"quick_gelu": lambda v: v * torch.sigmoid(1.702 * v), "gelu": lambda v: F.gelu(v)}[cfg.hidden_act]

    def ln(v, q):
        return F.layer_norm(v, (d,), s[f"{q}.weight"], s[f"{q}.bias"], eps)

    for i in range(cfg.num_hidden_layers):
        q_ = f"{p}encoder.layers.{i}"
        h = ln(x, f"{q_}.layer_norm1")
        q, k, v = (_lin(h, s, f"{q_}.self_attn.{n}_proj").reshape(b, t, nh, hd).transpose(1, 2) for n in "qkv")
        a = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5 + causal, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, t, d)
        x = x + _lin(o, s, f"{q_}.self_attn.out_proj")
        h = ln(x, f"{q_}.layer_norm2")
        x = x + _lin(act(_lin(h, s, f"{q_}.mlp.fc1")), s, f"{q_}.mlp.fc2")
    x = ln(x, f"{p}final_layer_norm")
    first_eos = (ids == cfg.eos_token_id).int().argmax(dim=-1)
    return x, x[torch.arange(b), first_eos]


def generate_clip(out):
    os.makedirs(out, exist_ok=True)
    tok, tok_nj, vocab, merges = build_tokenizers(out)

    enc = tok(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True)
    ids = torch.tensor(enc.input_ids, dtype=torch.long)
    assert ids.shape == (len(PROMPTS), MAX_LEN)
    ids_nj = torch.tensor(
        tok_nj(PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids, dtype=torch.long
    )
    full_lengths = [len(tok(p).input_ids) for p in PROMPTS]  # with BOS/EOS, before truncation
    truncated = [n > MAX_LEN for n in full_lengths]
    assert any(truncated) and not all(truncated)

    # The documented tokenizer pipeline, reimplemented, gives the same ids (tokenizer/ folder).
    for i, p in enumerate(PROMPTS):
        body = reference_tokenize(p, vocab, merges)
        assert len(body) + 2 == full_lengths[i], (p, len(body), full_lengths[i])
        ref = [vocab[BOS]] + body[: MAX_LEN - 2] + [vocab[EOS]]
        ref += [vocab[EOS]] * (MAX_LEN - len(ref))
        assert ref == enc.input_ids[i], (p, ref, enc.input_ids[i])
    # tokenizer_nojson/ (SD-1.5-style config: added tokens `normalized: true`) differs only where a
    # special token is spelt in capitals.
    differs = [i for i in range(len(PROMPTS)) if not torch.equal(ids[i], ids_nj[i])]
    assert differs == [PROMPTS.index("<|STARTOFTEXT|> and <|EndOfText|> in capitals")], differs
    merged_tokens = sum(1 for row in enc.input_ids for t in row if 2 * 256 <= t < 2 * 256 + len(merges))
    assert merged_tokens > 20, merged_tokens

    io = {"input_ids": ids.to(torch.float32), "input_ids_nojson": ids_nj.to(torch.float32)}
    configs = {}
    for name, case in CLIP_CASES.items():
        cfg = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=case["num_hidden_layers"],
            hidden_act=case["hidden_act"],
            max_position_embeddings=MAX_LEN,
            layer_norm_eps=1e-5,
            projection_dim=32,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
        gen = torch.Generator().manual_seed(case["seed"])
        model = CLIPTextModel(cfg).eval()
        randomise_clip(model, gen)
        model.requires_grad_(False)
        d = os.path.join(out, name)
        model.save_pretrained(d, safe_serialization=True)
        if case["layout"] == "transformers4":
            from safetensors.torch import load_file

            f = os.path.join(d, "model.safetensors")
            state = {f"text_model.{k}": v for k, v in load_file(f).items()}
            assert not any(k.startswith("text_model.text_model.") for k in state)
            state["text_model.embeddings.position_ids"] = torch.arange(MAX_LEN, dtype=torch.int64)[None]
            write_safetensors_mixed(f, state, {"format": "pt"})
        configs[name] = cfg
        with torch.no_grad():
            o = model(input_ids=ids)
        suffix = case["key"][len("last_hidden_state"):]
        io[case["key"]] = o.last_hidden_state
        io[f"pooled{suffix}"] = o.pooler_output
        print(f"== clip {name}: {case['hidden_act']}, {case['num_hidden_layers']} layers, "
              f"{sum(p.numel() for p in model.parameters())} params, attn {model.config._attn_implementation}")
    io = {k: v.detach().to(torch.float32).contiguous() for k, v in io.items()}

    tokens = [tok.convert_ids_to_tokens(enc.input_ids[i][: min(full_lengths[i], MAX_LEN)]) for i in range(len(PROMPTS))]
    meta = {
        "prompts": json.dumps(PROMPTS, ensure_ascii=False),
        "truncated": json.dumps(truncated),
        "untruncated_lengths": json.dumps(full_lengths),
        "tokens": json.dumps(tokens, ensure_ascii=False),
        "nojson_differs": json.dumps(differs),
        "input_ids_dtype": "F32 holding exact integers (cast to i64/u32 before use)",
        "tokenizer_call": "tokenizer(prompts, padding='max_length', max_length=77, truncation=True).input_ids",
        "bos_token_id": str(vocab[BOS]),
        "eos_token_id": str(vocab[EOS]),
        "pad_token_id": str(vocab[EOS]),
        "vocab_size": str(len(vocab)),
        "num_merges": str(len(merges)),
        "encoder_call": "CLIPTextModel(input_ids=input_ids) with no attention_mask (causal mask only), "
        "position_ids = arange(77)",
        "pooled": "last_hidden_state[b, first index where input_ids == eos_token_id]",
        "seeds": json.dumps({k: v["seed"] for k, v in CLIP_CASES.items()}),
        "embedding_std": repr(EMBEDDING_STD),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "numpy_version": np.__version__,
    }
    write_safetensors(os.path.join(out, "io.safetensors"), io, meta)

    print(f"   tokenizer: vocab {len(vocab)}, merges {len(merges)}, bos {vocab[BOS]}, eos = pad {vocab[EOS]}, "
          f"merged tokens in the batch {merged_tokens}")
    for i, p in enumerate(PROMPTS):
        print(f"   prompt {i:>2} len {full_lengths[i]:>3}{' (truncated)' if truncated[i] else ''}: {p[:60]!r} -> "
              f"{' '.join(tokens[i][:12])}{' ...' if len(tokens[i]) > 12 else ''}")
    bad = []
    for k, v in io.items():
        print(f"   {k:<24} {str(list(v.shape)):<18} rms {rms(v):.6g}")
        if not torch.isfinite(v).all() or bool((v == 0).all()):
            bad.append(k)
    assert not bad, f"degenerate outputs: {bad}"
    self_check_clip(out, io, configs)


@torch.no_grad()
def self_check_clip(out, io, configs):
    from safetensors.torch import load_file

    ids = io["input_ids"].to(torch.long)
    for name, case in CLIP_CASES.items():
        d = os.path.join(out, name)
        suffix = case["key"][len("last_hidden_state"):]
        for impl in ("sdpa", "eager"):
            m = CLIPTextModel.from_pretrained(d, local_files_only=True, attn_implementation=impl).eval()
            o = m(input_ids=ids)
            torch.testing.assert_close(o.last_hidden_state, io[case["key"]], **TOL)
            torch.testing.assert_close(o.pooler_output, io[f"pooled{suffix}"], **TOL)
        s = load_file(os.path.join(d, "model.safetensors"))
        prefix = "text_model." if case["layout"] == "transformers4" else ""
        loaded = m.state_dict()
        assert {prefix + k for k in loaded} | ({f"{prefix}embeddings.position_ids"} if prefix else set()) == set(s)
        for k, v in loaded.items():
            assert torch.equal(v, s[prefix + k]), k
        x, pooled = reference_clip(s, configs[name], ids)
        torch.testing.assert_close(x, io[case["key"]], **TOL)
        torch.testing.assert_close(pooled, io[f"pooled{suffix}"], **TOL)
    print("   self-check: both encoders reload (sdpa and eager) and match the plain-torch reference; "
          "both tokenizer folders reload; plain-Python tokenizer matches")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "trainer", "tests", "fixtures"))
    ap.add_argument("--only", choices=["vae", "clip"])
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, python {sys.version.split()[0]}")
    if args.only in (None, "vae"):
        generate_vae(os.path.join(args.out, "vae"))
    if args.only in (None, "clip"):
        generate_clip(os.path.join(args.out, "clip"))


if __name__ == "__main__":
    main()
