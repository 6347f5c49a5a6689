#!/usr/bin/env python
"""Golden fixtures for lisa's diffusers-compatible Stable Diffusion UNet + ControlNet + LISA decoder.

Writes trainer/tests/fixtures/sd/<case>/ for three tiny cases (see scripts/goldens/README.md):

  sd15  SD 1.5-like: conv proj_in/proj_out, attention_head_dim = 2 (an int: 2 heads everywhere),
        flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, LISA hook `mid`.
  sd21  SD 2.1-like: Linear proj_in/proj_out, attention_head_dim = [1, 2, 4] (heads per level),
        upcast_attention=True, freq_shift=1, norm_eps=1e-6, LISA hook `down_5`.
  sdxl_layers  SDXL's deeper spatial transformers: transformer_layers_per_block = [1, 2, 3],
        Linear projections, heads per level, LISA hook `down_5`.
  sdxl  SDXL's layout: addition_embed_type "text_time" (pooled text + six time ids through
        add_embedding), DownBlock2D first, transformer_layers_per_block = [1, 2, 2], Linear
        projections, LISA hook `down_8`.

Everything is offline (models built from configs, random weights), float32, CPU, seeded.
Every parameter is re-randomised before saving so that no tensor is 0 or 1 by construction
(zero convs, the conditioning embedding's conv_out, the decoder's conv_out, norm gammas/betas).

Usage: python scripts/goldens/diffusers_sd.py [--out trainer/tests/fixtures/sd]
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import diffusers
from diffusers import ControlNetModel, UNet2DConditionModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONDITIONING_SCALE = 0.75
LISA_LAMBDA = 0.2
TIME_SINUSOIDAL_DIM = 32
CHANNEL_FLOOR = 4
TIMESTEPS = [999.0, 321.0]
COND_EMBED_CHANNELS = (4, 8, 8, 16)
BATCH = 2
SEQ = 5

COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 12, 16),
    layers_per_block=2,
    norm_num_groups=4,
    cross_attention_dim=12,
    flip_sin_to_cos=True,
)

CASES = {
    "sd15": dict(
        config=dict(
            COMMON,
            attention_head_dim=2,
            use_linear_projection=False,
            upcast_attention=False,
            freq_shift=0,
            norm_eps=1e-5,
        ),
        hook="mid",
        seed=1500,
    ),
    "sd21": dict(
        config=dict(
            COMMON,
            attention_head_dim=[1, 2, 4],
            use_linear_projection=True,
            upcast_attention=True,
            freq_shift=1,
            norm_eps=1e-6,
        ),
        hook="down_5",
        seed=2100,
    ),
    # SDXL's deeper spatial transformers: transformer_layers_per_block per level (the middle
    # block takes the last level's, the up blocks the levels' in reverse).
    "sdxl_layers": dict(
        config=dict(
            COMMON,
            attention_head_dim=[1, 2, 4],
            transformer_layers_per_block=[1, 2, 3],
            use_linear_projection=True,
            upcast_attention=False,
            freq_shift=0,
            norm_eps=1e-5,
        ),
        hook="down_5",
        seed=2300,
        extra_grads=[
            "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight",
            "mid_block.attentions.0.transformer_blocks.2.ff.net.2.weight",
        ],
    ),
    # SDXL's layout: no attention at the first level, deeper transformers below, and the
    # text_time added embedding (pooled text of POOLED_DIM + six ids of addition_time_embed_dim).
    "sdxl": dict(
        config=dict(
            COMMON,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[1, 2, 4],
            transformer_layers_per_block=[1, 2, 2],
            use_linear_projection=True,
            upcast_attention=False,
            freq_shift=0,
            norm_eps=1e-5,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=10 + 6 * 4,
        ),
        hook="down_8",
        seed=2400,
        pooled_dim=10,
        # original (h, w), crop (top, left), target (h, w): the same for every sample, as
        # train_controlnet_sdxl.py makes them.
        time_ids=[1024.0, 896.0, 16.0, 32.0, 1024.0, 1024.0],
        # down_blocks.0 has no attention in this layout.
        drop_grads=["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
        extra_grads=[
            "add_embedding.linear_1.weight",
            "add_embedding.linear_2.bias",
            "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight",
        ],
    ),
}

# Gradients of `loss` saved for these parameters (names in the saved safetensors files).
CONTROLNET_GRADS = [
    "controlnet_cond_embedding.conv_in.weight",
    "conv_in.weight",
    "down_blocks.0.resnets.0.conv1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.1.attentions.0.proj_in.weight",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "controlnet_down_blocks.0.weight",
    "controlnet_mid_block.bias",
    "time_embedding.linear_1.weight",
]
LISA_GRADS = ["time_proj.weight", "stages.0.weight", "conv_out.weight"]


# ----------------------------------------------------------------------------------------------
# The LISA decoder, a line-by-line port of trainer/src/model/decoder.rs.
# ----------------------------------------------------------------------------------------------


def sinusoidal_embedding(t, dim):
    """trainer/src/nn/embedding.rs `sinusoidal_embedding`: cos first, ω_i = 10000^(−i/half),
    computed in f64 and rounded to f32 (as the Rust code does). Odd dims leave the last entry 0."""
    half = dim // 2
    t = torch.as_tensor(t, dtype=torch.float64)
    i = torch.arange(half, dtype=torch.float64)
    freq = torch.exp(-math.log(10000.0) * i / half)
    arg = t[:, None] * freq[None, :]
    out = torch.zeros(t.shape[0], dim, dtype=torch.float64)
    out[:, :half] = torch.cos(arg)
    out[:, half : 2 * half] = torch.sin(arg)
    return out.to(torch.float32)


class LisaDecoder(nn.Module):
    """D(h, t) = conv_out(stages(silu(h + time_proj(sin(t))))) with k = log2(out_res / r_h)
    stages of [conv (1x1 if i == 0 and C >= 512 else 3x3, padding k/2) -> SiLU -> nearest x2],
    channels halved each stage down to min(floor, C); one 3x3 conv -> SiLU when k = 0."""

    def __init__(self, c_h, r_h, out_channels, out_res, time_sinusoidal_dim, channel_floor):
        super().__init__()
        assert out_res % r_h == 0 and ((out_res // r_h) & (out_res // r_h - 1)) == 0
        k = (out_res // r_h).bit_length() - 1
        self.time_sinusoidal_dim = time_sinusoidal_dim
        self.time_proj = nn.Linear(time_sinusoidal_dim, c_h)
        self.stages = nn.ModuleList()
        self.upsample = []
        ch = c_h
        if k == 0:
            self.stages.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.upsample.append(False)
        for i in range(k):
            nxt = max(ch // 2, min(channel_floor, ch))
            kernel = 1 if (i == 0 and ch >= 512) else 3
            self.stages.append(nn.Conv2d(ch, nxt, kernel, padding=kernel // 2))
            self.upsample.append(True)
            ch = nxt
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, h, t):
        n, c = h.shape[0], h.shape[1]
        sin = sinusoidal_embedding(t, self.time_sinusoidal_dim).to(h.device)
        e = self.time_proj(sin).reshape(n, c, 1, 1)
        x = F.silu(h + e)
        for conv, up in zip(self.stages, self.upsample):
            x = F.silu(conv(x))
            if up:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv_out(x)


# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def randomise(model, gen):
    """Every parameter away from 0 and 1: ndim >= 2 weights N(0, 1/fan_in); norm gammas
    1 + 0.1·N(0,1); every other 1-D tensor (biases, norm betas) 0.1·N(0,1)."""
    gammas = set()
    for mname, m in model.named_modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            gammas.add(f"{mname}.weight" if mname else "weight")
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif name in gammas:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        raise RuntimeError(f"unexpected buffer {name}: the fixture would not hold it")


def write_safetensors(path, tensors, metadata):
    """A byte-reproducible safetensors file (safetensors' own writer orders `__metadata__`
    through a hash map, so its bytes change from run to run): f32 tensors, keys sorted, data in
    key order, header padded with spaces to a multiple of 8."""
    header = {"__metadata__": {k: str(metadata[k]) for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(torch.float32).contiguous().cpu()
        raw = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def rms(x):
    return float(x.detach().double().pow(2).mean().sqrt())


def hook_module(controlnet, hook):
    if hook == "mid":
        return controlnet.controlnet_mid_block
    assert hook.startswith("down_")
    return controlnet.controlnet_down_blocks[int(hook[len("down_") :])]


def generate(case, spec, out_root):
    out = os.path.join(out_root, case)
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(spec["seed"])

    # --- models -------------------------------------------------------------------------------
    unet = UNet2DConditionModel(**spec["config"]).eval()
    randomise(unet, gen)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_EMBED_CHANNELS).eval()
    randomise(controlnet, gen)  # everything, including the parts from_unet copied
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    controlnet.save_pretrained(os.path.join(out, "controlnet"), safe_serialization=True)

    # --- inputs -------------------------------------------------------------------------------
    cfg = spec["config"]
    res = cfg["sample_size"]
    sample = torch.randn(BATCH, cfg["in_channels"], res, res, generator=gen)
    timestep = torch.tensor(TIMESTEPS, dtype=torch.float32)
    ehs = torch.randn(BATCH, SEQ, cfg["cross_attention_dim"], generator=gen)
    cond = torch.rand(BATCH, 3, res * 8, res * 8, generator=gen)
    noise = torch.randn(BATCH, cfg["out_channels"], res, res, generator=gen)
    # SDXL's added conditions (diffusers' added_cond_kwargs), else none.
    added = {}
    if "pooled_dim" in spec:
        added = dict(
            text_embeds=torch.randn(BATCH, spec["pooled_dim"], generator=gen),
            time_ids=torch.tensor([spec["time_ids"]] * BATCH, dtype=torch.float32),
        )
    kw = dict(added_cond_kwargs=added) if added else {}

    # --- frozen prior -------------------------------------------------------------------------
    unet.requires_grad_(False)
    with torch.no_grad():
        unet_t_sinusoid = unet.time_proj(timestep)
        unet_temb = unet.time_embedding(unet_t_sinusoid)
        unet_out = unet(sample, timestep, ehs, **kw).sample

    # --- ControlNet with the LISA hook ----------------------------------------------------------
    controlnet.requires_grad_(True)
    captured = {}

    def pre_hook(_module, args):
        captured["h"] = args[0]  # kept in the graph: loss_lisa back-propagates into the ControlNet

    handle = hook_module(controlnet, spec["hook"]).register_forward_pre_hook(pre_hook)
    with torch.no_grad():
        cond_embedding = controlnet.controlnet_cond_embedding(cond)
    down_res, mid_res = controlnet(
        sample, timestep, ehs, controlnet_cond=cond, conditioning_scale=CONDITIONING_SCALE, return_dict=False, **kw
    )
    handle.remove()
    hook_feature = captured["h"]

    unet_out_res = unet(
        sample,
        timestep,
        ehs,
        down_block_additional_residuals=down_res,
        mid_block_additional_residual=mid_res,
        **kw,
    ).sample

    # --- LISA decoder ----------------------------------------------------------------------------
    c_h, r_h = hook_feature.shape[1], hook_feature.shape[2]
    decoder = LisaDecoder(c_h, r_h, cfg["out_channels"], res, TIME_SINUSOIDAL_DIM, CHANNEL_FLOOR)
    randomise(decoder, gen)
    decoder_state = {k: v.detach().clone().contiguous() for k, v in decoder.state_dict().items()}
    lisa_decoded = decoder(hook_feature, TIMESTEPS)
    lisa_target = (noise - unet_out).detach()

    loss_diffusion = F.mse_loss(unet_out_res, noise)
    loss_lisa = F.mse_loss(lisa_decoded, lisa_target)
    loss = loss_diffusion + LISA_LAMBDA * loss_lisa

    drop = spec.get("drop_grads", [])
    controlnet_grads = [g for g in CONTROLNET_GRADS if g not in drop] + spec.get("extra_grads", [])
    cn_params = dict(controlnet.named_parameters())
    dec_params = dict(decoder.named_parameters())
    wrt = [cn_params[n] for n in controlnet_grads] + [dec_params[n] for n in LISA_GRADS]
    grads = torch.autograd.grad(loss, wrt, retain_graph=True)
    cn_wrt = [cn_params[n] for n in controlnet_grads]
    grads_diff = torch.autograd.grad(loss_diffusion, cn_wrt, retain_graph=True)

    # --- write ----------------------------------------------------------------------------------
    io = {
        "sample": sample,
        "timestep": timestep,
        "encoder_hidden_states": ehs,
        "controlnet_cond": cond,
        "noise": noise,
        "unet_t_sinusoid": unet_t_sinusoid,
        "unet_temb": unet_temb,
        "unet_out": unet_out,
        "controlnet_cond_embedding": cond_embedding,
    }
    if added:
        io["text_embeds"] = added["text_embeds"]
        io["time_ids"] = added["time_ids"]
    for i, d in enumerate(down_res):
        io[f"controlnet_down.{i}"] = d
    io["controlnet_mid"] = mid_res
    io["hook_feature"] = hook_feature
    io["unet_out_with_residuals"] = unet_out_res
    io["lisa_t_sinusoid"] = sinusoidal_embedding(TIMESTEPS, TIME_SINUSOIDAL_DIM)
    io["lisa_decoded"] = lisa_decoded
    io["lisa_target"] = lisa_target
    io["loss_diffusion"] = loss_diffusion.reshape(1)
    io["loss_lisa"] = loss_lisa.reshape(1)
    io["loss"] = loss.reshape(1)
    for n, g in zip(controlnet_grads, grads[: len(controlnet_grads)]):
        io[f"grad.controlnet.{n}"] = g
    for n, g in zip(LISA_GRADS, grads[len(controlnet_grads) :]):
        io[f"grad.lisa.{n}"] = g
    for n, g in zip(controlnet_grads, grads_diff):
        io[f"grad_diffusion.controlnet.{n}"] = g
    io = {k: v.detach().to(torch.float32).contiguous() for k, v in io.items()}

    meta = {
        "case": case,
        "conditioning_scale": repr(CONDITIONING_SCALE),
        "lisa_lambda": repr(LISA_LAMBDA),
        "hook": spec["hook"],
        "hook_channels": str(c_h),
        "hook_resolution": str(r_h),
        "time_sinusoidal_dim": str(TIME_SINUSOIDAL_DIM),
        "channel_floor": str(CHANNEL_FLOOR),
        "decoder_out_channels": str(cfg["out_channels"]),
        "decoder_out_resolution": str(res),
        "timesteps": json.dumps(TIMESTEPS),
        "conditioning_embedding_out_channels": json.dumps(list(COND_EMBED_CHANNELS)),
        "loss": "loss_diffusion + lisa_lambda * loss_lisa; both torch mse_loss (mean over all elements)",
        "loss_diffusion": "mean((unet_out_with_residuals - noise)^2)",
        "loss_lisa": "mean((lisa_decoded - lisa_target)^2), lisa_target = noise - unet_out (no grad)",
        "seed": str(spec["seed"]),
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "numpy_version": np.__version__,
    }
    if added:
        meta["time_ids"] = json.dumps(spec["time_ids"])
    write_safetensors(os.path.join(out, "io.safetensors"), io, meta)
    dec_meta = {k: meta[k] for k in ("hook", "hook_channels", "hook_resolution", "time_sinusoidal_dim",
                                     "channel_floor", "decoder_out_channels", "decoder_out_resolution")}
    write_safetensors(os.path.join(out, "lisa_decoder.safetensors"), decoder_state, dec_meta)

    # --- report ---------------------------------------------------------------------------------
    print(f"== {case}: hook {spec['hook']} -> {tuple(hook_feature.shape)}")
    print(f"   unet params {sum(p.numel() for p in unet.parameters())}, "
          f"controlnet params {sum(p.numel() for p in controlnet.parameters())}, "
          f"decoder params {sum(p.numel() for p in decoder.parameters())}")
    for k, v in decoder_state.items():
        print(f"   lisa_decoder {k:<40} {str(list(v.shape)):<18} rms {rms(v):.4g}")
    bad = []
    for k, v in io.items():
        print(f"   {k:<80} {str(list(v.shape)):<18} rms {rms(v):.6g}")
        if not torch.isfinite(v).all() or bool((v == 0).all()):
            bad.append(k)
    assert not bad, f"degenerate outputs: {bad}"
    self_check(out, spec, io, decoder, kw)


@torch.no_grad()
def self_check(out, spec, io, decoder, kw):
    """The files alone reproduce the outputs: reload both models from the saved folders (as
    diffusers would) and the decoder from its safetensors, rerun, compare."""
    from safetensors.torch import load_file

    # Not bit-exact: torch's CPU kernels pick different code paths (and round differently,
    # ~1e-6) depending on e.g. whether parameters require grad and the thread count.
    TOL = dict(rtol=1e-5, atol=1e-5)

    unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet"), local_files_only=True).eval()
    cn = ControlNetModel.from_pretrained(os.path.join(out, "controlnet"), local_files_only=True).eval()
    s, t, e, c = io["sample"], io["timestep"], io["encoder_hidden_states"], io["controlnet_cond"]
    torch.testing.assert_close(unet(s, t, e, **kw).sample, io["unet_out"], **TOL)
    down, mid = cn(s, t, e, controlnet_cond=c, conditioning_scale=CONDITIONING_SCALE, return_dict=False, **kw)
    for i, d in enumerate(down):
        torch.testing.assert_close(d, io[f"controlnet_down.{i}"], **TOL)
    torch.testing.assert_close(mid, io["controlnet_mid"], **TOL)
    # conditioning_scale multiplies the zero-conv outputs (bias included).
    zc = hook_module(cn, spec["hook"])
    ref = io["controlnet_mid"] if spec["hook"] == "mid" else io[f"controlnet_down.{spec['hook'][5:]}"]
    torch.testing.assert_close(CONDITIONING_SCALE * zc(io["hook_feature"]), ref, rtol=1e-6, atol=1e-6)
    out2 = unet(s, t, e, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kw).sample
    torch.testing.assert_close(out2, io["unet_out_with_residuals"], **TOL)
    dec_state = load_file(os.path.join(out, "lisa_decoder.safetensors"))
    assert set(dec_state) == set(decoder.state_dict())
    decoder.load_state_dict(dec_state)
    torch.testing.assert_close(decoder(io["hook_feature"], TIMESTEPS), io["lisa_decoded"], **TOL)
    ld = F.mse_loss(io["unet_out_with_residuals"], io["noise"])
    ll = F.mse_loss(io["lisa_decoded"], io["noise"] - io["unet_out"])
    torch.testing.assert_close(ld.reshape(1), io["loss_diffusion"])
    torch.testing.assert_close(ll.reshape(1), io["loss_lisa"])
    torch.testing.assert_close((ld + LISA_LAMBDA * ll).reshape(1), io["loss"])
    print("   self-check: reloaded files reproduce every output")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "trainer", "tests", "fixtures", "sd"))
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {sys.version.split()[0]}")
    for case in args.case or sorted(CASES):
        generate(case, CASES[case], args.out)


if __name__ == "__main__":
    main()
