#!/usr/bin/env python
"""Golden fixtures for lisa's diffusers-compatible SD3 transformer and SD3 ControlNet.

Writes trainer/tests/fixtures/sd3/<case>/ for two tiny cases:

  sd3   SD3-like: no qk norm, no dual attention; pos_embed_max_size 6 > the 4x4 patch grid, so
        the positions are a centred crop; ControlNet `from_transformer` with 2 of the 3 blocks
        (one residual per 1.5 transformer blocks, diffusers' `interval_control`) and one extra
        conditioning channel.
  sd35  SD3.5-like: 4 blocks, qk_norm rms_norm, dual attention in blocks 0 and 1; ControlNet
        with 2 blocks (one residual per 2 transformer blocks). (A ControlNet with all the
        transformer's blocks cannot be made by `from_transformer`: the last transformer block is
        `context_pre_only`, the ControlNet's are not.)

Everything is offline (models built from configs, random weights), float32, CPU, seeded. Every
parameter is re-randomised (the zero-initialised ControlNet blocks and input embedding too) so
that no output is zero by construction; the persistent `pos_embed.pos_embed` buffer keeps its
sin-cos values.

Each case folder: transformer/ and controlnet/ (diffusers folders: config.json and
diffusion_pytorch_model.safetensors) and io.safetensors: the inputs (hidden_states,
encoder_hidden_states, pooled_projections, timestep, controlnet_cond) and the outputs
(transformer_out without residuals, controlnet_block_<i> residuals after the conditioning scale,
controlnet_hidden_<i> = the input of controlnet_blocks[i], transformer_out_controlled), and
lisa.safetensors: LISA on the flow model. A velocity target `target` (noise - x0), the token
LISA decoder (a port of trainer/src/model/decoder.rs, weights `decoder.*`) on the hooked
ControlNet tokens, its output, the LISA target stopgrad(target - transformer_out), the losses
(diffusion MSE + lambda * LISA MSE) and torch-autograd gradients of the loss for ControlNet and
decoder tensors (`grad.controlnet.<name>`, `grad.lisa.<name>`).

Usage: python scripts/goldens/diffusers_sd3.py [--out trainer/tests/fixtures/sd3]
"""

import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn

import diffusers
from diffusers import SD3ControlNetModel, SD3Transformer2DModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import rms, sinusoidal_embedding, write_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONDITIONING_SCALE = 0.75
TIMESTEPS = [750.0, 125.5]
BATCH = 2
SEQ = 5

COMMON = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    attention_head_dim=4,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=8,
    pooled_projection_dim=10,
    pos_embed_max_size=6,
)

CASES = {
    "sd3": dict(config=dict(COMMON), controlnet_layers=2, extra_channels=1, seed=3000, hook="block_1"),
    "sd35": dict(
        config=dict(COMMON, num_layers=4, qk_norm="rms_norm", dual_attention_layers=(0, 1)),
        controlnet_layers=2,
        extra_channels=0,
        seed=3500,
        hook="block_0",
    ),
}

LISA_LAMBDA = 0.2
TIME_SINUSOIDAL_DIM = 16
CHANNEL_FLOOR = 2
# The ControlNet tensors whose LISA-loss gradients lisa.safetensors pins (the hooked block's
# path and the residuals' path) and every decoder tensor.
LISA_CONTROLNET_GRADS = [
    "pos_embed_input.proj.weight",
    "time_text_embed.text_embedder.linear_1.weight",
    "transformer_blocks.0.attn.to_k.weight",
    "transformer_blocks.0.norm1.linear.bias",
    "controlnet_blocks.0.weight",
]
LISA_DECODER_GRADS = [
    "time_proj.weight",
    "time_proj.bias",
    "stages.0.weight",
    "stages.0.bias",
    "proj_out.weight",
    "proj_out.bias",
]


class TokenLisaDecoder(nn.Module):
    """The token LISA decoder of trainer/src/model/decoder.rs: D(h, t) = unpatchify(proj_out(
    silu(stages.0(silu(h + time_proj(sin(t))))))), stages.0 from C to max(C // 2, min(floor, C)),
    proj_out to patch * patch * channels per token."""

    def __init__(self, width, patch, out_channels, time_sinusoidal_dim, channel_floor):
        super().__init__()
        hidden = max(width // 2, min(channel_floor, width))
        self.time_sinusoidal_dim = time_sinusoidal_dim
        self.patch, self.out_channels = patch, out_channels
        self.time_proj = nn.Linear(time_sinusoidal_dim, width)
        self.stages = nn.ModuleList([nn.Linear(width, hidden)])
        self.proj_out = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, h, t):
        n = h.shape[0]
        e = self.time_proj(sinusoidal_embedding(t, self.time_sinusoidal_dim)).reshape(n, 1, -1)
        x = torch.nn.functional.silu(h + e)
        x = torch.nn.functional.silu(self.stages[0](x))
        y = self.proj_out(x)
        g, p, c = int(round(math.sqrt(y.shape[1]))), self.patch, self.out_channels
        y = y.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", y).reshape(n, c, g * p, g * p)


@torch.no_grad()
def randomise(model, gen):
    """Every parameter away from 0 and 1: ndim >= 2 weights N(0, 1/fan_in); RMS-norm weights
    1 + 0.1·N(0,1); every other 1-D tensor 0.1·N(0,1). Buffers are kept (the sin-cos table)."""
    gammas = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "RMSNorm" and m.weight is not None}
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
        elif name in gammas:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, _ in model.named_buffers():
        if name != "pos_embed.pos_embed":
            raise RuntimeError(f"unexpected buffer {name}: the fixture would not hold it")


def save_folder(model, path):
    os.makedirs(path, exist_ok=True)
    model.save_config(path)
    tensors = dict(model.state_dict())
    write_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"), tensors, {"format": "pt"})


def forward_kwargs(io):
    """The keyword arguments both networks take from a case's inputs (text and time)."""
    return dict(
        encoder_hidden_states=io["encoder_hidden_states"],
        pooled_projections=io["pooled_projections"],
        timestep=io["timestep"],
    )


def run(transformer, controlnet, io):
    """The outputs of one case from its inputs."""
    hidden = {}

    def keep(i):
        def hook(_module, args):
            hidden[f"controlnet_hidden_{i}"] = args[0].detach().clone()

        return hook

    handles = [b.register_forward_pre_hook(keep(i)) for i, b in enumerate(controlnet.controlnet_blocks)]
    common = forward_kwargs(io)
    out = {"transformer_out": transformer(io["hidden_states"], **common).sample}
    blocks = controlnet(
        io["hidden_states"], controlnet_cond=io["controlnet_cond"], conditioning_scale=CONDITIONING_SCALE, **common
    ).controlnet_block_samples
    for h in handles:
        h.remove()
    for i, b in enumerate(blocks):
        out[f"controlnet_block_{i}"] = b
    out.update(hidden)
    out["transformer_out_controlled"] = transformer(
        io["hidden_states"], block_controlnet_hidden_states=list(blocks), **common
    ).sample
    return out


# The ControlNet tensors whose gradients the fixture pins (every kind of layer: the condition
# embedding, the embeddings, the modulations, both attention streams, the feed-forward, the
# zero-initialised output projection). In `sd3` (3 blocks, 2 residuals) diffusers adds residual 0
# after blocks 0 and 1 and none after the context_pre_only block 2, so residual 1, ControlNet
# block 1 and block 0's text output never reach the output; `sd35` (4 blocks, 2 residuals) uses
# both, and pins those too.
GRAD_TENSORS = [
    "pos_embed_input.proj.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "time_text_embed.text_embedder.linear_2.bias",
    "context_embedder.weight",
    "transformer_blocks.0.norm1.linear.weight",
    "transformer_blocks.0.norm1_context.linear.bias",
    "transformer_blocks.0.attn.to_q.weight",
    "transformer_blocks.0.attn.add_k_proj.weight",
    "transformer_blocks.0.ff.net.0.proj.weight",
    "controlnet_blocks.0.weight",
]
GRAD_TENSORS_SD35 = [
    "transformer_blocks.0.attn.to_add_out.weight",
    "transformer_blocks.0.ff_context.net.2.weight",
    "transformer_blocks.0.attn.norm_q.weight",
    "transformer_blocks.0.attn.norm_added_k.weight",
    "transformer_blocks.0.attn2.to_v.weight",
    "transformer_blocks.1.attn2.norm_k.weight",
    "controlnet_blocks.1.bias",
]


def gradients(transformer, controlnet, io, gen):
    """`L = Σ w ⊙ transformer(x, residuals = controlnet(x, cond))` with a fixed random `w`: the
    weights `w` (`grad_seed`) and torch-autograd's `∂L/∂θ` for the GRAD_TENSORS (`grad.<name>`)."""
    names = GRAD_TENSORS + (GRAD_TENSORS_SD35 if transformer.config.qk_norm else [])
    params = dict(controlnet.named_parameters())
    for p in controlnet.parameters():
        p.requires_grad_(True)
        p.grad = None
    common = forward_kwargs(io)
    with torch.enable_grad():
        blocks = controlnet(
            io["hidden_states"], controlnet_cond=io["controlnet_cond"], conditioning_scale=CONDITIONING_SCALE, **common
        ).controlnet_block_samples
        out = transformer(io["hidden_states"], block_controlnet_hidden_states=list(blocks), **common).sample
        w = torch.randn(out.shape, generator=gen)
        (out * w).sum().backward()
    grads = {"grad_seed": w}
    for n in names:
        g = params[n].grad
        assert g is not None and rms(g) > 0, n
        grads[f"grad.{n}"] = g.detach().clone()
    for p in controlnet.parameters():
        p.requires_grad_(False)
    return grads


def lisa_tensors(decoder, target, hook_feature, decoded, lisa_target, losses, controlnet_grads, grads):
    """The tensors of a lisa.safetensors: the decoder's weights (`decoder.*`), the velocity
    target, the hooked feature, the decoder's output, the LISA target, the three losses and the
    gradients (`grads`, in the order of `controlnet_grads` then LISA_DECODER_GRADS) as
    `grad.controlnet.<name>` and `grad.lisa.<name>`."""
    loss_diffusion, loss_lisa, loss = losses
    out = {f"decoder.{k}": v.detach().clone() for k, v in decoder.state_dict().items()}
    out.update(
        target=target,
        hook_feature=hook_feature.detach(),
        lisa_decoded=decoded.detach(),
        lisa_target=lisa_target,
        loss_diffusion=loss_diffusion.detach().reshape(1),
        loss_lisa=loss_lisa.detach().reshape(1),
        loss=loss.detach().reshape(1),
    )
    names = [f"grad.controlnet.{n}" for n in controlnet_grads] + [f"grad.lisa.{n}" for n in LISA_DECODER_GRADS]
    out.update({n: g.detach().clone() for n, g in zip(names, grads)})
    return out


def lisa_losses(controlnet, decoder, forward, controlnet_grads):
    """`mse(controlled, target) + LISA_LAMBDA · mse(decoded, stopgrad(target − prior))` of a
    LISA pass (`forward`: the hooked feature, the decoder's output, the prior, the controlled
    prediction and the target) and torch-autograd's gradients of it for the ControlNet tensors
    `controlnet_grads` and LISA_DECODER_GRADS (called under enable_grad): the tensors of
    lisa.safetensors (lisa_tensors) and the gradients. SD3's and Flux's alike."""
    hook_feature, decoded, prior, controlled, target = forward
    lisa_target = (target - prior).detach()
    loss_diffusion = torch.nn.functional.mse_loss(controlled, target)
    loss_lisa = torch.nn.functional.mse_loss(decoded, lisa_target)
    loss = loss_diffusion + LISA_LAMBDA * loss_lisa
    cn_params, dec_params = dict(controlnet.named_parameters()), dict(decoder.named_parameters())
    wrt = [cn_params[n] for n in controlnet_grads] + [dec_params[n] for n in LISA_DECODER_GRADS]
    grads = torch.autograd.grad(loss, wrt)
    losses = (loss_diffusion, loss_lisa, loss)
    return lisa_tensors(decoder, target, hook_feature, decoded, lisa_target, losses, controlnet_grads, grads), grads


def lisa(transformer, controlnet, io, spec, gen):
    """LISA on the flow model (see the module docstring): the tensors of lisa.safetensors."""
    c = transformer.config
    hook = int(spec["hook"][len("block_") :])
    decoder = TokenLisaDecoder(
        c.num_attention_heads * c.attention_head_dim, c.patch_size, c.out_channels, TIME_SINUSOIDAL_DIM, CHANNEL_FLOOR
    )
    randomise(decoder, gen)
    target = torch.randn(io["hidden_states"].shape, generator=gen)
    for p in controlnet.parameters():
        p.requires_grad_(True)
    common = forward_kwargs(io)
    captured = {}

    def pre_hook(_module, args):
        captured["h"] = args[0]

    handle = controlnet.controlnet_blocks[hook].register_forward_pre_hook(pre_hook)
    with torch.enable_grad():
        with torch.no_grad():
            prior = transformer(io["hidden_states"], **common).sample
        blocks = controlnet(
            io["hidden_states"], controlnet_cond=io["controlnet_cond"], conditioning_scale=CONDITIONING_SCALE, **common
        ).controlnet_block_samples
        handle.remove()
        controlled = transformer(io["hidden_states"], block_controlnet_hidden_states=list(blocks), **common).sample
        decoded = decoder(captured["h"], io["timestep"])
        forward = (captured["h"], decoded, prior, controlled, target)
        out, _ = lisa_losses(controlnet, decoder, forward, LISA_CONTROLNET_GRADS)
    for p in controlnet.parameters():
        p.requires_grad_(False)
    meta = {
        "hook": spec["hook"],
        "lisa_lambda": LISA_LAMBDA,
        "time_sinusoidal_dim": TIME_SINUSOIDAL_DIM,
        "channel_floor": CHANNEL_FLOOR,
        "loss": "mse(transformer_out_controlled, target) + lisa_lambda * mse(lisa_decoded, target - transformer_out)",
    }
    return out, meta


@torch.no_grad()
def generate(case, spec, out_root):
    gen = torch.Generator().manual_seed(spec["seed"])
    transformer = SD3Transformer2DModel(**spec["config"]).eval()
    randomise(transformer, gen)
    folder = os.path.join(out_root, case)
    # Saved first: `from_transformer` writes num_layers and extra_conditioning_channels into the
    # transformer's own config (diffusers 0.42.1 mutates it in place).
    save_folder(transformer, os.path.join(folder, "transformer"))
    controlnet = SD3ControlNetModel.from_transformer(
        transformer, num_layers=spec["controlnet_layers"], num_extra_conditioning_channels=spec["extra_channels"]
    ).eval()
    randomise(controlnet, gen)
    c = spec["config"]
    side = c["sample_size"]
    io = {
        "hidden_states": torch.randn(BATCH, c["in_channels"], side, side, generator=gen),
        "encoder_hidden_states": torch.randn(BATCH, SEQ, c["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(BATCH, c["pooled_projection_dim"], generator=gen),
        "timestep": torch.tensor(TIMESTEPS),
        "controlnet_cond": torch.randn(BATCH, c["in_channels"] + spec["extra_channels"], side, side, generator=gen),
    }
    out = run(transformer, controlnet, io)
    grads = gradients(transformer, controlnet, io, gen)
    # LISA draws from its own generator, so io.safetensors is the same with or without it.
    lisa_out, lisa_meta = lisa(transformer, controlnet, io, spec, torch.Generator().manual_seed(spec["seed"] + 1))
    save_folder(controlnet, os.path.join(folder, "controlnet"))
    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "conditioning_scale": CONDITIONING_SCALE,
        "case": case,
    }
    write_safetensors(os.path.join(folder, "io.safetensors"), {**io, **out, **grads}, meta)
    write_safetensors(os.path.join(folder, "lisa.safetensors"), lisa_out, {**meta, **lisa_meta})
    for k, v in {**out, **grads, **lisa_out}.items():
        assert torch.isfinite(v).all() and rms(v) > 0, k
        print(f"  {case} {k:28s} {tuple(v.shape)} rms {rms(v):.4f}")
    # Reload the saved folders and reproduce every output.
    t2 = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    c2 = SD3ControlNetModel.from_pretrained(os.path.join(folder, "controlnet")).eval()
    again = run(t2, c2, io)
    for k in out:
        err = float((again[k] - out[k]).abs().max())
        assert err <= 1e-5, f"{case} {k}: reloaded differs by {err}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "trainer", "tests", "fixtures", "sd3"))
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {sys.version.split()[0]}")
    for case in args.case or sorted(CASES):
        generate(case, CASES[case], args.out)


if __name__ == "__main__":
    main()
