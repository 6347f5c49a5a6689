#!/usr/bin/env python
"""Golden fixtures for lisa's diffusers-compatible Flux transformer and Flux ControlNet.

Writes trainer/tests/fixtures/flux/<case>/ for two tiny cases. Both transformers:
FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=None (= 16), num_layers=2,
num_single_layers=3, attention_head_dim=8, num_attention_heads=2 (inner dim 16),
joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=[2, 2, 4] (sums to the head dim)).

  dev    FLUX.1-dev-like: guidance_embeds=True (the time embedding adds a guidance embedder),
         ControlNet `FluxControlNetModel.from_transformer(transformer, num_layers=1,
         num_single_layers=2, attention_head_dim=8, num_attention_heads=2)`. diffusers'
         `interval_control = ceil(len(blocks) / len(residuals))` maps the 1 double residual onto
         both double blocks (interval 2: blocks 0, 1 <- residual 0) and the 2 single residuals onto
         the 3 single blocks (interval ceil(1.5) = 2: single blocks 0, 1 <- residual 0, single
         block 2 <- residual 1). Seed 4000.
  union  FLUX.1-schnell-like time embedding (guidance_embeds=False, no guidance input) and an
         InstantX-style ControlNet-Union: `FluxControlNetModel.from_config({**transformer.config,
         num_layers=2, num_single_layers=1, num_mode=3})` (from_config, not `__init__`, because the
         transformer's config has `out_channels`, which the ControlNet's `__init__` does not take;
         it is what `from_transformer` does too), then the transformer's weights copied where the
         names match exactly as `from_transformer` does. Interval 1 for the double blocks (block i
         <- residual i), interval 3 for the single blocks (all 3 <- residual 0). The ControlNet's
         forward gets `controlnet_mode = [[0], [2]]` (long, [batch, 1], as FluxControlNetPipeline
         passes it): `controlnet_mode_embedder(mode)` ([2, 1, 16]) is prepended to the embedded
         text tokens (6 text tokens inside the ControlNet) and `txt_ids` grows by its own first row
         (`cat([txt_ids[:1], txt_ids])`, 6 rows) before the rotary embedding; the transformer
         itself still sees 5 text tokens. Seed 4100.

Neither ControlNet has `conditioning_embedding_channels` (no input_hint_block), so
`controlnet_cond` is already-packed latents through `controlnet_x_embedder` and the pipeline's
`controlnet_blocks_repeat` is False (the interval mapping above is used).

Everything is offline (models built from configs, random weights), float32, CPU, seeded. Every
parameter is re-randomised after construction (the zero-initialised controlnet_blocks,
controlnet_single_blocks and controlnet_x_embedder too, and the weights `from_transformer` copied,
so the ControlNet shares no values with the transformer): ndim >= 2 weights N(0, 1/fan_in)
(std 0.25 for the 16-wide linears, 0.0625 for the 256-wide timestep/guidance embedders, 0.11 for
the single blocks' 80-wide proj_out), the union mode embedding N(0, 1) (like text tokens), RMS-norm
gammas (attn.norm_q/norm_k/norm_added_q/norm_added_k) 1 + 0.1·N(0,1), every other 1-D tensor
(biases) 0.1·N(0,1). Nothing is 0 or 1 by construction and the activations stay O(1). The models
have no buffers (FluxPosEmbed computes the rotary table from the ids).

Each case folder: transformer/ and controlnet/ (diffusers folders written by `save_pretrained(
safe_serialization=True)`: config.json and diffusion_pytorch_model.safetensors) and
io.safetensors (all F32, keys sorted; ids and the mode as F32 holding exact integers):

  inputs
    latents                [2, 4, 8, 8]   unpacked noisy latents, N(0,1)
    control_latents        [2, 4, 8, 8]   unpacked condition latents, N(0,1)
    hidden_states          [2, 16, 16]    FluxPipeline._pack_latents(latents, 2, 4, 8, 8): view(b, c,
                                          h/2, 2, w/2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 16):
                                          token = row·4 + col in the 4x4 grid of 2x2 patches,
                                          channel = c·4 + dy·2 + dx
    controlnet_cond        [2, 16, 16]    control_latents packed the same way
    encoder_hidden_states  [2, 5, 12]     text tokens, N(0,1)
    pooled_projections     [2, 10]        pooled text, N(0,1)
    timestep               [2]            [0.75, 0.125]: flow sigmas; both models multiply by 1000
    guidance               [2]            dev only: [3.5, 3.5] (also multiplied by 1000 inside)
    img_ids                [16, 3]        FluxPipeline._prepare_latent_image_ids(2, 4, 4): (0, row, col)
    txt_ids                [5, 3]         zeros
    controlnet_mode        [2, 1]         union only: [[0], [2]] (passed to the model as long)
  outputs
    rope_cos, rope_sin     [21, 8]        transformer.pos_embed(cat([txt_ids, img_ids])): per axis
                                          (dims 2, 2, 4, theta 10000) cos/sin of id·theta^(-2k/d),
                                          each frequency repeated twice (repeat_interleave_real),
                                          axes concatenated; rows 0..4 text, 5..20 image
    controlnet_rope_cos,   [22, 8]        union only: the ControlNet's own table over its 6 text
    controlnet_rope_sin                   ids (first txt_id repeated) and the 16 image ids
    temb                   [2, 16]        transformer.time_text_embed(1000·timestep[, 1000·guidance],
                                          pooled_projections) (a forward hook's output)
    controlnet_temb        [2, 16]        the same for the ControlNet's own time_text_embed
    transformer_out        [2, 16, 16]    transformer(...).sample without residuals (the prior)
    transformer_out_unpacked [2, 4, 8, 8] transformer_out through FluxPipeline._unpack_latents(out,
                                          height=64, width=64, vae_scale_factor=8): view(b, 4, 4,
                                          c/4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 4, 8, 8),
                                          the exact inverse of the packing
    controlnet_hidden_<i>  [2, 16, 16]    the input of controlnet_blocks[i] (a forward hook): the
                                          image tokens after ControlNet double block i
    controlnet_single_hidden_<i> [2,16,16] the input of controlnet_single_blocks[i]: the image
                                          tokens (text tokens split off) after single block i
    controlnet_block_<i>   [2, 16, 16]    controlnet(...).controlnet_block_samples[i]: after
                                          controlnet_blocks[i] and the conditioning scale 0.75
    controlnet_single_block_<i> [2,16,16] controlnet_single_block_samples[i], likewise
    transformer_out_controlled [2,16,16]  transformer(..., controlnet_block_samples,
                                          controlnet_single_block_samples).sample
                                          (controlnet_blocks_repeat False)

  gradients
    grad_seed              [2, 4, 8, 8]   a fixed N(0,1) weight w (drawn after the outputs)
    grad.<name>                           torch-autograd ∂L/∂θ of L = Σ w ⊙ unpack(transformer_out_
                                          controlled) for the ControlNet tensors of GRAD_TENSORS
                                          (+ the guidance embedder's in dev, the mode embedding in
                                          union): embedders, both streams of double block 0, single
                                          block 0, the residual projections

dev has i in {0} double and {0, 1} single; union has {0, 1} double and {0} single.

dev also gets lisa.safetensors: LISA on Flux, drawn after everything above (so the tensors above
do not move). A velocity target `target` [2, 4, 8, 8] (noise - x0, unpacked), the token LISA
decoder of trainer/src/model/decoder.rs (diffusers_sd3.py's port, weights `decoder.*`; width 16,
2x2 patches of 4 channels, sinusoidal time 16, channel floor 2) on the tokens entering
controlnet_single_blocks[1] (hook `single_block_1`) at time 1000·timestep, its output
`lisa_decoded` [2, 4, 8, 8], the LISA target stopgrad(target - unpack(prior)), the losses
(diffusion MSE on unpack(controlled) + lambda * LISA MSE, lambda 0.2) and torch-autograd
gradients of the loss for ControlNet and decoder tensors (`grad.controlnet.<name>`,
`grad.lisa.<name>`).

Metadata: versions, case, seed, conditioning_scale, the transformer and ControlNet configs (JSON,
without diffusers' `_` keys), `double_block_residual` / `single_block_residual` (the residual
index each transformer block adds), guidance, controlnet_mode, the packing/unpacking calls.

Note: both ControlNet config.json files hold `"out_channels": null`, a key FluxControlNetModel
does not take: `from_transformer` (and this script's union path, which copies it) builds the
ControlNet with `from_config(transformer.config)`, and diffusers keeps the unexpected key in the
saved config (it warns and ignores it on load). A loader must ignore it.

Usage: python scripts/goldens/diffusers_flux.py [--out trainer/tests/fixtures/flux] [--case dev]
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import diffusers
from diffusers import FluxControlNetModel, FluxPipeline, FluxTransformer2DModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import rms, write_safetensors  # noqa: E402
from diffusers_sd3 import (  # noqa: E402
    CHANNEL_FLOOR,
    LISA_LAMBDA,
    TIME_SINUSOIDAL_DIM,
    TokenLisaDecoder,
    lisa_losses,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONDITIONING_SCALE = 0.75
TIMESTEPS = [0.75, 0.125]
GUIDANCE = [3.5, 3.5]
CONTROLNET_MODE = [[0], [2]]
BATCH = 2
SEQ = 5
LATENT_CHANNELS = 4
LATENT_SIDE = 8
# Pixel size whose latents are LATENT_SIDE at vae_scale_factor 8 (for _unpack_latents).
PIXEL_SIDE = 64
VAE_SCALE_FACTOR = 8

COMMON = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    axes_dims_rope=[2, 2, 4],
)

CASES = {
    "dev": dict(
        config=dict(COMMON, guidance_embeds=True),
        controlnet=dict(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2),
        union=False,
        seed=4000,
    ),
    "union": dict(
        config=dict(COMMON, guidance_embeds=False),
        controlnet=dict(num_layers=2, num_single_layers=1, num_mode=3),
        union=True,
        seed=4100,
    ),
}


@torch.no_grad()
def randomise(model, gen):
    """Every parameter away from 0 and 1: ndim >= 2 weights N(0, 1/fan_in) (nn.Embedding tables
    N(0, 1)); RMS-norm weights 1 + 0.1·N(0,1); every other 1-D tensor 0.1·N(0,1)."""
    modules = dict(model.named_modules())
    gammas = {f"{n}.weight" for n, m in modules.items() if type(m).__name__ == "RMSNorm" and m.weight is not None}
    tables = {f"{n}.weight" for n, m in modules.items() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if name in tables:
            p.copy_(torch.randn(p.shape, generator=gen))
        elif p.ndim >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif name in gammas:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, _ in model.named_buffers():
        raise RuntimeError(f"unexpected buffer {name}: the fixture would not hold it")


def make_controlnet(transformer, spec):
    if not spec["union"]:
        return FluxControlNetModel.from_transformer(transformer, **spec["controlnet"])
    # What from_transformer does, with num_mode (which it cannot pass on).
    controlnet = FluxControlNetModel.from_config({**transformer.config, **spec["controlnet"]})
    controlnet.pos_embed.load_state_dict(transformer.pos_embed.state_dict())
    controlnet.time_text_embed.load_state_dict(transformer.time_text_embed.state_dict())
    controlnet.context_embedder.load_state_dict(transformer.context_embedder.state_dict())
    controlnet.x_embedder.load_state_dict(transformer.x_embedder.state_dict())
    controlnet.transformer_blocks.load_state_dict(transformer.transformer_blocks.state_dict(), strict=False)
    controlnet.single_transformer_blocks.load_state_dict(transformer.single_transformer_blocks.state_dict(), strict=False)
    return controlnet


def pack(latents):
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens):
    return FluxPipeline._unpack_latents(tokens, PIXEL_SIDE, PIXEL_SIDE, VAE_SCALE_FACTOR)


def public(config):
    """A model config without diffusers' bookkeeping keys (`_class_name`, `_use_default_values`, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def forward_kwargs(io):
    """The keyword arguments both networks take from a case's inputs (text, time, ids, guidance)."""
    return dict(
        encoder_hidden_states=io["encoder_hidden_states"],
        pooled_projections=io["pooled_projections"],
        timestep=io["timestep"],
        img_ids=io["img_ids"],
        txt_ids=io["txt_ids"],
        guidance=io.get("guidance"),
    )


def residual_map(n_blocks, n_residuals):
    """diffusers' interval_control: transformer block j gets residual j // ceil(n_blocks / n_residuals)."""
    interval = int(np.ceil(n_blocks / n_residuals))
    return [j // interval for j in range(n_blocks)]


@torch.no_grad()
def run(transformer, controlnet, io):
    """The outputs of one case from its inputs (hooks record temb and the controlnet_blocks' inputs)."""
    out, handles = {}, []

    def keep_input(name):
        def hook(_module, args, _output):
            out[name] = args[0].detach().clone()

        return hook

    def keep_output(name):
        def hook(_module, _args, output):
            out[name] = output.detach().clone()

        return hook

    for i, b in enumerate(controlnet.controlnet_blocks):
        handles.append(b.register_forward_hook(keep_input(f"controlnet_hidden_{i}")))
    for i, b in enumerate(controlnet.controlnet_single_blocks):
        handles.append(b.register_forward_hook(keep_input(f"controlnet_single_hidden_{i}")))
    handles.append(transformer.time_text_embed.register_forward_hook(keep_output("temb")))
    handles.append(controlnet.time_text_embed.register_forward_hook(keep_output("controlnet_temb")))

    common = forward_kwargs(io)
    cos, sin = transformer.pos_embed(torch.cat([io["txt_ids"], io["img_ids"]], dim=0))
    out["rope_cos"], out["rope_sin"] = cos.float(), sin.float()
    if controlnet.union:
        ids = torch.cat([io["txt_ids"][:1], io["txt_ids"], io["img_ids"]], dim=0)
        cos, sin = controlnet.pos_embed(ids)
        out["controlnet_rope_cos"], out["controlnet_rope_sin"] = cos.float(), sin.float()

    out["transformer_out"] = transformer(io["hidden_states"], **common).sample
    out["transformer_out_unpacked"] = unpack(out["transformer_out"])
    mode = io["controlnet_mode"].long() if controlnet.union else None
    res = controlnet(
        io["hidden_states"],
        controlnet_cond=io["controlnet_cond"],
        controlnet_mode=mode,
        conditioning_scale=CONDITIONING_SCALE,
        **common,
    )
    for h in handles:
        h.remove()
    blocks, singles = list(res.controlnet_block_samples), list(res.controlnet_single_block_samples)
    for i, b in enumerate(blocks):
        out[f"controlnet_block_{i}"] = b
    for i, b in enumerate(singles):
        out[f"controlnet_single_block_{i}"] = b
    out["transformer_out_controlled"] = transformer(
        io["hidden_states"],
        controlnet_block_samples=blocks,
        controlnet_single_block_samples=singles,
        controlnet_blocks_repeat=False,
        **common,
    ).sample
    return out


# ControlNet tensors whose torch-autograd gradients are pinned: every kind of parameter on the
# path (the condition and input embedders, the time, guidance and text embeddings, both streams
# of a double block with their RMS norms and feed-forwards, a single block's modulation, MLP,
# attention and split-input output projection, the zero-initialised residual projections, and
# union mode's embedding).
GRAD_TENSORS = [
    "controlnet_x_embedder.weight",
    "x_embedder.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_1.bias",
    "context_embedder.weight",
    "transformer_blocks.0.norm1.linear.weight",
    "transformer_blocks.0.norm1_context.linear.bias",
    "transformer_blocks.0.attn.to_q.weight",
    "transformer_blocks.0.attn.norm_k.weight",
    "transformer_blocks.0.attn.add_k_proj.weight",
    "transformer_blocks.0.attn.norm_added_q.weight",
    "transformer_blocks.0.attn.to_add_out.weight",
    "transformer_blocks.0.ff.net.0.proj.weight",
    "transformer_blocks.0.ff_context.net.2.weight",
    "single_transformer_blocks.0.norm.linear.weight",
    "single_transformer_blocks.0.proj_mlp.weight",
    "single_transformer_blocks.0.attn.to_v.weight",
    "single_transformer_blocks.0.attn.norm_q.weight",
    "single_transformer_blocks.0.proj_out.weight",
    "controlnet_blocks.0.weight",
    "controlnet_single_blocks.0.bias",
]
GRAD_TENSORS_GUIDANCE = ["time_text_embed.guidance_embedder.linear_2.weight"]
GRAD_TENSORS_UNION = ["controlnet_mode_embedder.weight"]


def gradients(transformer, controlnet, io, gen):
    """`L = Σ w ⊙ unpack(transformer(x, residuals = controlnet(x, cond)))` with a fixed random `w`
    of the latents' shape: `w` (`grad_seed`) and torch-autograd's `∂L/∂θ` for the GRAD_TENSORS
    (`grad.<name>`)."""
    names = GRAD_TENSORS + (GRAD_TENSORS_GUIDANCE if transformer.config.guidance_embeds else [])
    names += GRAD_TENSORS_UNION if controlnet.union else []
    params = dict(controlnet.named_parameters())
    for p in controlnet.parameters():
        p.requires_grad_(True)
        p.grad = None
    common = forward_kwargs(io)
    mode = io["controlnet_mode"].long() if controlnet.union else None
    with torch.enable_grad():
        res = controlnet(
            io["hidden_states"],
            controlnet_cond=io["controlnet_cond"],
            controlnet_mode=mode,
            conditioning_scale=CONDITIONING_SCALE,
            **common,
        )
        out = transformer(
            io["hidden_states"],
            controlnet_block_samples=list(res.controlnet_block_samples),
            controlnet_single_block_samples=list(res.controlnet_single_block_samples),
            controlnet_blocks_repeat=False,
            **common,
        ).sample
        out = unpack(out)
        w = torch.randn(out.shape, generator=gen)
        (out * w).sum().backward()
    grads = {"grad_seed": w}
    for n in names:
        g = params[n].grad
        assert g is not None and rms(g) > 0, n
        grads[f"grad.{n}"] = g.detach().clone()
    for p in controlnet.parameters():
        p.requires_grad_(False)
        p.grad = None
    return grads


LISA_HOOK = "single_block_1"
# ControlNet tensors on the paths of both losses (the hooked single block's and a double
# block's); every decoder tensor too (diffusers_sd3.LISA_DECODER_GRADS).
LISA_CONTROLNET_GRADS = [
    "controlnet_x_embedder.weight",
    "time_text_embed.guidance_embedder.linear_2.weight",
    "transformer_blocks.0.attn.add_k_proj.weight",
    "single_transformer_blocks.1.proj_out.weight",
    "single_transformer_blocks.0.norm.linear.bias",
    "controlnet_single_blocks.1.weight",
]


def lisa(transformer, controlnet, io, gen):
    """LISA on Flux (see the module docstring): the tensors and metadata of lisa.safetensors."""
    c = transformer.config
    decoder = TokenLisaDecoder(
        c.num_attention_heads * c.attention_head_dim, 2, c.in_channels // 4, TIME_SINUSOIDAL_DIM, CHANNEL_FLOOR
    )
    randomise(decoder, gen)
    target = torch.randn(io["latents"].shape, generator=gen)
    for p in controlnet.parameters():
        p.requires_grad_(True)
    common = forward_kwargs(io)
    captured = {}

    def pre_hook(_module, args):
        captured["h"] = args[0]

    index = int(LISA_HOOK[len("single_block_") :])
    handle = controlnet.controlnet_single_blocks[index].register_forward_pre_hook(pre_hook)
    with torch.enable_grad():
        with torch.no_grad():
            prior = unpack(transformer(io["hidden_states"], **common).sample)
        res = controlnet(
            io["hidden_states"], controlnet_cond=io["controlnet_cond"], conditioning_scale=CONDITIONING_SCALE, **common
        )
        handle.remove()
        controlled = unpack(
            transformer(
                io["hidden_states"],
                controlnet_block_samples=list(res.controlnet_block_samples),
                controlnet_single_block_samples=list(res.controlnet_single_block_samples),
                controlnet_blocks_repeat=False,
                **common,
            ).sample
        )
        decoded = decoder(captured["h"], io["timestep"] * 1000)
        forward = (captured["h"], decoded, prior, controlled, target)
        out, grads = lisa_losses(controlnet, decoder, forward, LISA_CONTROLNET_GRADS)
    for p in controlnet.parameters():
        p.requires_grad_(False)
    assert all(rms(g) > 0 for g in grads), "a LISA gradient is zero"
    meta = {
        "hook": LISA_HOOK,
        "lisa_lambda": LISA_LAMBDA,
        "time_sinusoidal_dim": TIME_SINUSOIDAL_DIM,
        "channel_floor": CHANNEL_FLOOR,
        "conditioning_scale": CONDITIONING_SCALE,
    }
    return out, {k: str(v) for k, v in meta.items()}


@torch.no_grad()
def generate(case, spec, out_root):
    gen = torch.Generator().manual_seed(spec["seed"])
    transformer = FluxTransformer2DModel(**spec["config"]).eval()
    randomise(transformer, gen)
    folder = os.path.join(out_root, case)
    before = dict(transformer.config)
    controlnet = make_controlnet(transformer, spec).eval()
    randomise(controlnet, gen)
    assert dict(transformer.config) == before, "building the ControlNet changed the transformer's config"

    c = spec["config"]
    shape = (BATCH, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
    io = {
        "latents": torch.randn(shape, generator=gen),
        "control_latents": torch.randn(shape, generator=gen),
        "encoder_hidden_states": torch.randn(BATCH, SEQ, c["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(BATCH, c["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor(TIMESTEPS),
        "img_ids": FluxPipeline._prepare_latent_image_ids(
            BATCH, LATENT_SIDE // 2, LATENT_SIDE // 2, torch.device("cpu"), torch.float32
        ),
        "txt_ids": torch.zeros(SEQ, 3),
    }
    io["hidden_states"] = pack(io["latents"])
    io["controlnet_cond"] = pack(io["control_latents"])
    assert io["hidden_states"].shape == (BATCH, (LATENT_SIDE // 2) ** 2, c["in_channels"])
    assert torch.equal(unpack(io["hidden_states"]), io["latents"]), "unpack is not the inverse of pack"
    if c["guidance_embeds"]:
        io["guidance"] = torch.tensor(GUIDANCE)
    if spec["union"]:
        io["controlnet_mode"] = torch.tensor(CONTROLNET_MODE, dtype=torch.float32)

    out = run(transformer, controlnet, io)
    grads = gradients(transformer, controlnet, io, gen)
    lisa_files = lisa(transformer, controlnet, io, gen) if case == "dev" else None
    transformer.save_pretrained(os.path.join(folder, "transformer"), safe_serialization=True)
    controlnet.save_pretrained(os.path.join(folder, "controlnet"), safe_serialization=True)

    cn = controlnet.config
    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "case": case,
        "seed": spec["seed"],
        "conditioning_scale": CONDITIONING_SCALE,
        "transformer_config": json.dumps(public(transformer.config), sort_keys=True),
        "controlnet_config": json.dumps(public(cn), sort_keys=True),
        "double_block_residual": json.dumps(residual_map(c["num_layers"], cn.num_layers)),
        "single_block_residual": json.dumps(residual_map(c["num_single_layers"], cn.num_single_layers)),
        "controlnet_blocks_repeat": "false",
        "guidance": json.dumps(GUIDANCE if c["guidance_embeds"] else None),
        "controlnet_mode": json.dumps(CONTROLNET_MODE if spec["union"] else None),
        "pack": "FluxPipeline._pack_latents(latents, 2, 4, 8, 8)",
        "unpack": f"FluxPipeline._unpack_latents(x, {PIXEL_SIDE}, {PIXEL_SIDE}, {VAE_SCALE_FACTOR})",
        "img_ids": "FluxPipeline._prepare_latent_image_ids(2, 4, 4)",
    }
    write_safetensors(os.path.join(folder, "io.safetensors"), {**io, **out, **grads}, meta)
    if lisa_files is not None:
        lisa_out, lisa_meta = lisa_files
        lisa_meta.update(diffusers=diffusers.__version__, torch=torch.__version__, case=case)
        write_safetensors(os.path.join(folder, "lisa.safetensors"), lisa_out, lisa_meta)
        print(f"  {case} lisa: loss {float(lisa_out['loss'][0]):.4f}, {len(lisa_out)} tensors")
    for k, v in out.items():
        assert torch.isfinite(v).all() and rms(v) > 0, k
        print(f"  {case} {k:28s} {str(tuple(v.shape)):14s} rms {rms(v):.4f} max|x| {float(v.abs().max()):.4f}")
    d = float((out["transformer_out_controlled"] - out["transformer_out"]).abs().max())
    assert d > 1e-3, f"{case}: the residuals barely change the output ({d})"
    print(f"  {case} max|controlled - prior| {d:.4f}")

    # Reload the saved folders and reproduce every output.
    t2 = FluxTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    c2 = FluxControlNetModel.from_pretrained(os.path.join(folder, "controlnet")).eval()
    again = run(t2, c2, io)
    assert sorted(again) == sorted(out)
    worst = 0.0
    for k in out:
        err = float((again[k] - out[k]).abs().max())
        worst = max(worst, err)
        assert err <= 1e-5, f"{case} {k}: reloaded differs by {err}"
    print(f"  {case} reloaded with from_pretrained: max difference {worst:g}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "trainer", "tests", "fixtures", "flux"))
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {sys.version.split()[0]}")
    for case in args.case or sorted(CASES):
        generate(case, CASES[case], args.out)


if __name__ == "__main__":
    main()
