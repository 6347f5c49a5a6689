#!/usr/bin/env python3
"""PyTorch reference of lisa's toy reference configuration, for timing against lisa's CPU backend.

It builds the same model as `lisa-trainer`'s `toy` architecture with `ModelSpec::default()`
(trainer/src/model/toy/, trainer/src/model/decoder.rs, trainer/src/nn/) with the same parameter
names and shapes, and the same training step as `Trainer::step` (trainer/src/train.rs,
trainer/src/model/forward.rs, trainer/src/optim/mod.rs), prior pretraining step
(trainer/src/pretrain.rs) and sampler (trainer/src/sample.rs, DDIM defaults), then times them.

    python torch_toy.py                      # every measurement, each in its own subprocess
    python torch_toy.py --steps 3 --only lisa,baseline
    python torch_toy.py --measure lisa       # one measurement in this process (JSON on stdout)
    python torch_toy.py --check-prior assets/prior.safetensors

What is identical to lisa: architecture, parameter names/shapes/counts, initial-value
distributions, which tensors are trainable, the step's structure (main encoder under no_grad,
side network, main decoder with residuals, LISA prior pass re-running only the main decoder
without residuals under no_grad, LISA decoder on the hooked side feature, MSE losses with
lambda = 0.2, backward, global-norm clipping to 1.0, AdamW, the finiteness read-back), batch
sizes and the sampler's arithmetic. What is not: random streams (torch's generator, not
lisa's Philox), kernels (oneDNN/MKL vs lisa's), and the data loader (vectorised torch ops on
the fly vs lisa's per-example Rust loops over a 4096-example FillCircles set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# --------------------------------------------------------------------------------------------
# The configuration: lisa's defaults (ModelSpec::default(), TrainConfig::default(),
# PretrainConfig::default(), SampleConfig::default()), as used by trainer/benches/step.rs.
# --------------------------------------------------------------------------------------------
CONFIG = {
    # UNetConfig::default()
    "image_channels": 3,
    "resolution": 32,
    "channels": [32, 64, 64],
    "norm_groups": 8,
    "norm_eps": 1e-5,
    "time_sinusoidal_dim": 64,
    "time_dim": 128,
    "prompt_classes": [9, 9],
    "attention": False,
    "prediction": "epsilon",
    # ControlConfig::default()
    "hint_channels": 1,
    "hint_hidden": 16,
    "conditioning_scale": 1.0,
    # DecoderConfig::default()
    "hook": "down_1",
    "decoder_time_sinusoidal_dim": 256,
    "decoder_channel_floor": 16,
    # TrainConfig::default() (benches/step.rs leaves it at its defaults)
    "batch_size": 32,
    "lisa_lambda": 0.2,
    "train_lr": 1e-4,
    "train_weight_decay": 1e-2,
    "betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "max_grad_norm": 1.0,
    "train_ema": None,
    "proportion_empty_prompts": 0.0,
    # PretrainConfig::default()
    "pretrain_batch_size": 32,
    "pretrain_lr": 1e-3,
    "pretrain_weight_decay": 0.0,
    "pretrain_ema_decay": 0.999,
    "null_prompt_prob": 0.1,
    # NoiseConfig::default(): DDPM linear betas 1e-4 .. 0.02, T = 1000
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
    # SampleConfig::default(): DDIM eta 0, 25 steps, leading spacing, guidance 1 (off),
    # control scale 1, clip_sample; the measurement samples 64 images.
    "sample_steps": 25,
    "sample_images": 64,
    "guidance_scale": 1.0,
    "control_scale": 1.0,
    "clip_sample": True,
}

PALETTE = [
    [0.9, 0.1, 0.1],
    [0.1, 0.8, 0.2],
    [0.1, 0.2, 0.9],
    [0.95, 0.9, 0.1],
    [0.1, 0.85, 0.9],
    [0.85, 0.1, 0.85],
    [0.95, 0.95, 0.95],
    [0.05, 0.05, 0.05],
]
NULL_ID = 8

MEASUREMENTS = ["baseline", "lisa", "lisa_sub16", "pair", "prior_pass", "decoder", "pretrain", "sample"]
DESCRIPTIONS = {
    "baseline": "baseline ControlNet step (batch 32)",
    "lisa": "LISA step (batch 32, lambda 0.2)",
    "lisa_sub16": "LISA step, LISA sub-batch 16",
    "pair": "baseline and LISA steps alternated in one process (median over pairs of LISA/baseline)",
    "prior_pass": "prior pass (main up path, no grad, batch 32)",
    "decoder": "LISA decoder forward + backward (batch 32)",
    "pretrain": "prior pretraining step (batch 32)",
    "sample": "DDIM-25 sampling of 64 images (conditioned, no guidance)",
}


# --------------------------------------------------------------------------------------------
# lisa's parameter counts, from the Rust constructors' arithmetic (independent of the torch
# modules below; the main network's is also checked against a lisa-written safetensors file).
# --------------------------------------------------------------------------------------------
def lisa_param_counts(c=CONFIG):
    def conv(ci, co, k):
        return co * ci * k * k + co

    def lin(a, b):
        return a * b + b

    def gn(ch):
        return 2 * ch

    def res(ci, co):
        n = gn(ci) + conv(ci, co, 3) + lin(c["time_dim"], co) + gn(co) + conv(co, co, 3)
        return n + (conv(ci, co, 1) if ci != co else 0)

    ch = c["channels"]
    levels = len(ch)
    time = lin(c["time_sinusoidal_dim"], c["time_dim"]) + lin(c["time_dim"], c["time_dim"])
    time += sum(k * c["time_dim"] for k in c["prompt_classes"])
    enc = conv(c["image_channels"], ch[0], 3)
    prev = ch[0]
    for i, w in enumerate(ch):
        enc += res(prev, w)
        if i + 1 < levels:
            enc += conv(w, w, 3)  # stride-2 downsample
        prev = w
    enc += res(prev, prev)  # middle (attention off)
    up = 0
    prev = ch[-1]
    for i in reversed(range(levels)):
        up += res(prev + ch[i], ch[i])
        if i > 0:
            up += conv(ch[i], ch[i], 3)
        prev = ch[i]
    main = time + enc + up + gn(ch[0]) + conv(ch[0], c["image_channels"], 3)
    hh = c["hint_hidden"]
    hint = conv(c["hint_channels"], hh, 3) + conv(hh, hh, 3) + conv(hh, ch[0], 3)
    zero = sum(conv(w, w, 1) for w in ch) + conv(ch[-1], ch[-1], 1)
    side = time + hint + enc + zero
    # decoder: hook down_1 -> (channels[1], resolution / 2)
    hook_level = int(c["hook"].split("_")[1])
    c_h, r_h = ch[hook_level], c["resolution"] >> hook_level
    k = int(math.log2(c["resolution"] // r_h))
    dec = lin(c["decoder_time_sinusoidal_dim"], c_h)
    cur = c_h
    if k == 0:
        dec += conv(cur, cur, 3)
    for i in range(k):
        nxt = max(cur // 2, min(c["decoder_channel_floor"], cur))
        dec += conv(cur, nxt, 1 if (i == 0 and cur >= 512) else 3)
        cur = nxt
    dec += conv(cur, c["image_channels"], 3)
    return {"main": main, "side": side, "decoder": dec}


def read_safetensors_header(path):
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {})
    return {k: v["shape"] for k, v in header.items()}, meta


# --------------------------------------------------------------------------------------------
# The model (torch imported lazily so that --help and the counts need no torch).
# --------------------------------------------------------------------------------------------
def build_modules():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def lecun_(w, fan_in):
        with torch.no_grad():
            w.normal_(0.0, 1.0 / math.sqrt(fan_in))

    class Conv(nn.Conv2d):
        """lisa's Conv2d: padding k/2, LeCun-normal (or zero) weight, zero bias."""

        def __init__(self, ci, co, k, stride=1, zero=False):
            super().__init__(ci, co, k, stride=stride, padding=k // 2)
            with torch.no_grad():
                if zero:
                    self.weight.zero_()
                else:
                    lecun_(self.weight, ci * k * k)
                self.bias.zero_()

    class Lin(nn.Linear):
        def __init__(self, a, b):
            super().__init__(a, b)
            lecun_(self.weight, a)
            with torch.no_grad():
                self.bias.zero_()

    def group_norm(ch, c):
        groups = next(g for g in range(min(c["norm_groups"], ch), 0, -1) if ch % g == 0)
        return nn.GroupNorm(groups, ch, eps=c["norm_eps"])  # weight 1, bias 0

    def sinusoidal(t, dim):
        # diffusers get_timestep_embedding, cos first (trainer/src/nn/embedding.rs)
        half = dim // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        arg = t.to(torch.float64)[:, None] * freq[None, :]
        return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1).to(torch.float32)

    class ResBlock(nn.Module):
        def __init__(self, ci, co, c):
            super().__init__()
            self.norm1 = group_norm(ci, c)
            self.conv1 = Conv(ci, co, 3)
            self.time_emb_proj = Lin(c["time_dim"], co)
            self.norm2 = group_norm(co, c)
            self.conv2 = Conv(co, co, 3)
            self.conv_shortcut = Conv(ci, co, 1) if ci != co else None

        def forward(self, x, silu_temb):
            h = self.conv1(F.silu(self.norm1(x)))
            h = h + self.time_emb_proj(silu_temb)[:, :, None, None]
            h = self.conv2(F.silu(self.norm2(h)))
            skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
            return skip + h

    class Downsample(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv = Conv(ch, ch, 3, stride=2)

        def forward(self, x):
            return self.conv(x)

    class Upsample(nn.Module):
        def __init__(self, ch):
            super().__init__()
            self.conv = Conv(ch, ch, 3)

        def forward(self, x):
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    class TimeEmbedding(nn.Module):
        """silu(lin2(silu(lin1(sin(t)))) + sum_k emb_k(id_k))."""

        def __init__(self, c):
            super().__init__()
            self.linear_1 = Lin(c["time_sinusoidal_dim"], c["time_dim"])
            self.linear_2 = Lin(c["time_dim"], c["time_dim"])
            for i, k in enumerate(c["prompt_classes"]):
                emb = nn.Embedding(k, c["time_dim"])
                lecun_(emb.weight, 1)
                setattr(self, f"prompt_{i}", emb)
            self.n_prompts = len(c["prompt_classes"])
            self.sin_dim = c["time_sinusoidal_dim"]

        def forward(self, t, ids):
            e = self.linear_2(F.silu(self.linear_1(sinusoidal(t, self.sin_dim))))
            for i in range(self.n_prompts):
                e = e + getattr(self, f"prompt_{i}")(ids[i])
            return F.silu(e)

    class Level(nn.Module):
        def __init__(self, ci, co, down, c):
            super().__init__()
            self.res = ResBlock(ci, co, c)
            self.downsample = Downsample(co) if down else None

    class Mid(nn.Module):
        def __init__(self, ch, c):
            super().__init__()
            self.res = ResBlock(ch, ch, c)

    class Encoder(nn.Module):
        def __init__(self, c):
            super().__init__()
            ch = c["channels"]
            self.conv_in = Conv(c["image_channels"], ch[0], 3)
            levels, prev = [], ch[0]
            for i, w in enumerate(ch):
                levels.append(Level(prev, w, i + 1 < len(ch), c))
                prev = w
            self.down = nn.ModuleList(levels)
            self.mid = Mid(prev, c)

        def forward(self, x, silu_temb, after_conv_in=None):
            h = self.conv_in(x)
            if after_conv_in is not None:
                h = h + after_conv_in
            skips = []
            for lvl in self.down:
                h = lvl.res(h, silu_temb)
                skips.append(h)
                if lvl.downsample is not None:
                    h = lvl.downsample(h)
            return skips, self.mid.res(h, silu_temb)

    class UpLevel(nn.Module):
        def __init__(self, ci, co, up, c):
            super().__init__()
            self.res = ResBlock(ci, co, c)
            self.upsample = Upsample(co) if up else None

    class UNet(nn.Module):
        def __init__(self, c):
            super().__init__()
            ch = c["channels"]
            self.time = TimeEmbedding(c)
            self.encoder = Encoder(c)
            ups = [None] * len(ch)  # indexed by level, as lisa names them (up.{i})
            prev = ch[-1]
            for i in reversed(range(len(ch))):
                ups[i] = UpLevel(prev + ch[i], ch[i], i > 0, c)
                prev = ch[i]
            self.up = nn.ModuleList(ups)
            self.norm_out = group_norm(ch[0], c)
            self.conv_out = Conv(ch[0], c["image_channels"], 3)

        def encode(self, x_t, t, ids):
            temb = self.time(t, ids)
            skips, mid = self.encoder(x_t, temb)
            return temb, skips, mid

        def decode(self, enc, residuals=None, scale=1.0):
            """The up path; the side residuals (times `scale`) are added to the middle and
            every skip when given (UNet::decode)."""
            temb, skips, mid = enc

            def with_(x, r):
                if r is None:
                    return x
                return x + (r if scale == 1.0 else r * scale)

            h = with_(mid, residuals[1] if residuals else None)
            for i in reversed(range(len(skips))):
                skip = with_(skips[i], residuals[0][i] if residuals else None)
                h = self.up[i].res(torch.cat([h, skip], dim=1), temb)
                if self.up[i].upsample is not None:
                    h = self.up[i].upsample(h)
            return self.conv_out(F.silu(self.norm_out(h)))

    class ControlNet(nn.Module):
        def __init__(self, c):
            super().__init__()
            ch, hh = c["channels"], c["hint_hidden"]
            self.time = TimeEmbedding(c)
            self.hint = nn.ModuleList(
                [Conv(c["hint_channels"], hh, 3), Conv(hh, hh, 3), Conv(hh, ch[0], 3, zero=True)]
            )
            self.encoder = Encoder(c)
            self.zero_convs = nn.ModuleList([Conv(w, w, 1, zero=True) for w in ch])
            self.zero_mid = Conv(ch[-1], ch[-1], 1, zero=True)

        def forward(self, x_t, hint, t, ids):
            temb = self.time(t, ids)
            h = F.silu(self.hint[0](hint))
            h = F.silu(self.hint[1](h))
            skips, mid = self.encoder(x_t, temb, self.hint[2](h))
            down = [z(f) for f, z in zip(skips, self.zero_convs)]
            return (down, self.zero_mid(mid)), (skips, mid)

    class LisaDecoder(nn.Module):
        def __init__(self, c_h, r_h, c):
            super().__init__()
            out_res = c["resolution"]
            k = int(math.log2(out_res // r_h))
            self.dim = c["decoder_time_sinusoidal_dim"]
            self.time_proj = Lin(self.dim, c_h)
            stages, self.ups, cur = [], [], c_h
            if k == 0:
                stages.append(Conv(cur, cur, 3))
                self.ups.append(False)
            for i in range(k):
                nxt = max(cur // 2, min(c["decoder_channel_floor"], cur))
                stages.append(Conv(cur, nxt, 1 if (i == 0 and cur >= 512) else 3))
                self.ups.append(True)
                cur = nxt
            self.stages = nn.ModuleList(stages)
            self.conv_out = Conv(cur, c["image_channels"], 3, zero=True)

        def forward(self, h, t):
            e = self.time_proj(sinusoidal(t, self.dim))
            x = F.silu(h + e[:, :, None, None])
            for conv, up in zip(self.stages, self.ups):
                x = F.silu(conv(x))
                if up:
                    x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv_out(x)

    class ToyModel(nn.Module):
        """Parts::Prior (main only, all trainable) or Parts::Dual { decoder } (main frozen)."""

        def __init__(self, parts, c=CONFIG):
            super().__init__()
            self.c = c
            self.main = UNet(c)
            self.side = None
            self.lisa = None
            self.hook_level = int(c["hook"].split("_")[1])
            if parts != "prior":
                self.main.requires_grad_(False)
                self.side = ControlNet(c)
                if parts == "dual+decoder":
                    lvl = self.hook_level
                    self.lisa = LisaDecoder(c["channels"][lvl], c["resolution"] >> lvl, c)
                # ControlNet initialisation: side.{time,encoder} <- main.{time,encoder}
                self.side.time.load_state_dict(self.main.time.state_dict())
                self.side.encoder.load_state_dict(self.main.encoder.state_dict())

    return torch, F, ToyModel


# --------------------------------------------------------------------------------------------
# Data and noise (the distributions of lisa's FillCircles and noise_batch; torch's streams).
# --------------------------------------------------------------------------------------------
class Data:
    def __init__(self, torch, c, seed=0):
        self.torch = torch
        self.c = c
        # On the default device (--device): a CPU generator cannot feed CUDA tensors.
        self.gen = torch.Generator(device=torch.get_default_device()).manual_seed(seed)
        self.palette = torch.tensor(PALETTE, dtype=torch.float32)
        T = c["num_train_timesteps"]
        betas = torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        coords = torch.arange(c["resolution"], dtype=torch.float32) + 0.5
        self.xs = coords[None, None, :]
        self.ys = coords[None, :, None]

    def circles(self, n):
        """n fill-circles examples: image [n,3,r,r] in [-1,1], outline hint [n,1,r,r] in {0,1},
        prompt ids (fill, background), as trainer/src/data.rs draws them."""
        torch = self.torch
        res = float(self.c["resolution"])
        u = torch.rand(n, 3, generator=self.gen)
        radius = res * (0.15 + 0.2 * u[:, 0])
        margin = radius + 1.0
        span = (res - 2.0 * margin).clamp(min=0.0)
        cx = margin + span * u[:, 1]
        cy = margin + span * u[:, 2]
        fill = torch.randint(0, 8, (n,), generator=self.gen)
        background = (fill + 1 + torch.randint(0, 7, (n,), generator=self.gen)) % 8
        dist = torch.sqrt((self.xs - cx[:, None, None]) ** 2 + (self.ys - cy[:, None, None]) ** 2)
        r = radius[:, None, None]
        covers = (dist <= r)[:, None]
        image = torch.where(
            covers, self.palette[fill][:, :, None, None], self.palette[background][:, :, None, None]
        )
        image = image * 2.0 - 1.0
        hint = ((dist - r).abs() <= 0.75).to(torch.float32)[:, None]
        return image.contiguous(), hint.contiguous(), [fill, background]

    def noise(self, x0, ids, null_prob):
        """noise_batch: prompt dropout, t = floor(u*T), x_t = a x0 + s eps, y = eps."""
        torch = self.torch
        n = x0.shape[0]
        if null_prob > 0:
            drop = torch.rand(n, generator=self.gen) < null_prob
            ids = [torch.where(drop, torch.full_like(i, NULL_ID), i) for i in ids]
        T = self.c["num_train_timesteps"]
        t = (torch.rand(n, generator=self.gen) * T).long().clamp(max=T - 1)
        ab = self.alphas_cumprod[t]
        alpha, sigma = ab.sqrt(), (1.0 - ab).sqrt()
        eps = torch.randn(x0.shape, generator=self.gen)
        x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
        return x_t, eps, t.to(torch.float32), ids


# --------------------------------------------------------------------------------------------
# The steps.
# --------------------------------------------------------------------------------------------
class ControlTrainer:
    """Trainer::step for mode baseline / lisa (optionally LISA sub-batched)."""

    def __init__(self, torch, F, ToyModel, mode, subbatch=None, c=CONFIG):
        self.torch, self.F, self.c = torch, F, c
        self.mode, self.subbatch = mode, subbatch
        self.model = ToyModel("dual+decoder" if mode == "lisa" else "dual", c)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.trainable,
            lr=c["train_lr"],
            betas=tuple(c["betas"]),
            eps=c["adam_eps"],
            weight_decay=c["train_weight_decay"],
        )
        self.data = Data(torch, c, seed=0)

    def step(self):
        torch, F, c, m = self.torch, self.F, self.c, self.model
        x0, hint, ids = self.data.circles(c["batch_size"])
        x_t, y, t, ids = self.data.noise(x0, ids, c["proportion_empty_prompts"])
        with torch.no_grad():
            enc = m.main.encode(x_t, t, ids)
        residuals, features = m.side(x_t, hint, t, ids)
        pred = m.main.decode(enc, residuals, c["conditioning_scale"])
        loss = F.mse_loss(pred, y)
        if self.mode == "lisa":
            n = x_t.shape[0]
            k = min(self.subbatch or n, n)
            with torch.no_grad():
                enc_k = enc if k == n else (enc[0][:k], [s[:k] for s in enc[1]], enc[2][:k])
                prior = m.main.decode(enc_k, None)
            h = features[0][m.hook_level]
            decoded = m.lisa(h if k == n else h[:k], t[:k])
            tau = (y if k == n else y[:k]) - prior
            loss = loss + c["lisa_lambda"] * F.mse_loss(decoded, tau)
        value = loss.item()  # lisa checks the loss is finite
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, c["max_grad_norm"])
        self.opt.step()
        # lisa reads back one sum of squares over all trainable weights (divergence check)
        with torch.no_grad():
            total = torch.stack([p.pow(2).sum() for p in self.trainable]).sum()
        if not (math.isfinite(value) and math.isfinite(total.item())):
            raise RuntimeError("non-finite loss or weights")
        return value


class Pretrainer:
    """Pretrainer::step: main network alone, every weight trainable, AdamW (lr 1e-3, wd 0),
    clip 1.0, prompt dropout 0.1, EMA 0.999 with diffusers' warm-up."""

    def __init__(self, torch, F, ToyModel, c=CONFIG):
        self.torch, self.F, self.c = torch, F, c
        self.model = ToyModel("prior", c)
        self.params = list(self.model.parameters())
        self.opt = torch.optim.AdamW(
            self.params,
            lr=c["pretrain_lr"],
            betas=tuple(c["betas"]),
            eps=c["adam_eps"],
            weight_decay=c["pretrain_weight_decay"],
        )
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = c["pretrain_ema_decay"]
        self.steps = 0
        self.data = Data(torch, c, seed=0)

    def step(self):
        torch, F, c, m = self.torch, self.F, self.c, self.model
        x0, _hint, ids = self.data.circles(c["pretrain_batch_size"])
        x_t, y, t, ids = self.data.noise(x0, ids, c["null_prompt_prob"])
        pred = m.main.decode(m.main.encode(x_t, t, ids), None)
        loss = F.mse_loss(pred, y)
        value = loss.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, c["max_grad_norm"])
        self.opt.step()
        self.steps += 1
        s = self.steps - 1
        d = 0.0 if s == 0 else min(self.decay, (1.0 + s) / (10.0 + s))
        with torch.no_grad():
            for sh, p in zip(self.shadow, self.params):
                sh.mul_(d).add_(p, alpha=1.0 - d)
            total = torch.stack([p.pow(2).sum() for p in self.params]).sum()
        if not (math.isfinite(value) and math.isfinite(total.item())):
            raise RuntimeError("non-finite loss or weights")
        return value


def ddim_timesteps(c):
    # leading spacing: k * (T // n) for k = n-1 .. 0; previous = t - T // n (1.0 past the end)
    T, n = c["num_train_timesteps"], c["sample_steps"]
    return [k * (T // n) for k in reversed(range(n))], T // n


def sample(torch, model, data, hint, ids, c, steps=None):
    """sample(): DDIM eta 0, clip_sample, epsilon prediction, guidance_scale 1 (one branch)."""
    ts, ratio = ddim_timesteps(c)
    if steps is not None:
        ts = ts[:steps]
    ac = data.alphas_cumprod
    n = hint.shape[0]
    x = torch.randn(n, c["image_channels"], c["resolution"], c["resolution"], generator=data.gen)
    with torch.no_grad():
        for t in ts:
            tt = torch.full((n,), float(t))
            enc = model.main.encode(x, tt, ids)
            residuals, _ = model.side(x, hint, tt, ids)
            eps = model.main.decode(enc, residuals, c["control_scale"])
            a_t = ac[t]
            a_prev = ac[t - ratio] if t - ratio >= 0 else torch.tensor(1.0, device=x.device)
            alpha, sigma = a_t.sqrt(), (1.0 - a_t).sqrt()
            x0 = (x - sigma * eps) / alpha
            if c["clip_sample"]:
                x0 = x0.clamp(-1.0, 1.0)
            eps = (x - alpha * x0) / sigma
            x = a_prev.sqrt() * x0 + (1.0 - a_prev).clamp(min=0.0).sqrt() * eps
    return x


# --------------------------------------------------------------------------------------------
# Measuring.
# --------------------------------------------------------------------------------------------
def rss_kib(field="VmRSS:"):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def cpu_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure(name, args):
    rss_start = rss_kib()
    import torch

    threads = args.threads or cpu_threads()
    torch.set_num_threads(threads)
    if args.device != "cpu":
        # Models, data and noise are created on the device; each timed call ends synchronised.
        torch.set_default_device(args.device)
    if args.device.startswith("cuda"):
        # Exact f32 unless --tf32, for matmuls and cuDNN convolutions alike (cuDNN's own
        # default allows TF32; lisa's default is exact, so the default comparison is f32 to f32).
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(0)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    _torch, F, ToyModel = build_modules()
    rss_import = rss_kib()
    c = CONFIG
    times = []
    out = {"measurement": name, "description": DESCRIPTIONS[name], "threads": threads, "device": args.device}

    def timed(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        sync()
        out["rss_after_warmup_kib"] = rss_kib()
        for _ in range(repeats):
            s = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - s)

    if name in ("baseline", "lisa", "lisa_sub16"):
        mode = "baseline" if name == "baseline" else "lisa"
        tr = ControlTrainer(torch, F, ToyModel, mode, 16 if name == "lisa_sub16" else None)
        out["trainable_params"] = sum(p.numel() for p in tr.trainable)
        timed(tr.step, args.warmup, args.steps)
    elif name == "pair":
        # As benches/step.rs's `pair` arm: both trainers in one process, steps alternated (the
        # order swapped every pair); median_s is the LISA step's, paired_ratio the median ratio.
        base = ControlTrainer(torch, F, ToyModel, "baseline")
        lisa = ControlTrainer(torch, F, ToyModel, "lisa")

        def one(tr):
            s = time.perf_counter()
            tr.step()
            sync()
            return time.perf_counter() - s

        for _ in range(args.warmup):
            one(base)
            one(lisa)
        out["rss_after_warmup_kib"] = rss_kib()
        ratios, base_times = [], []
        for i in range(args.steps):
            if i % 2 == 0:
                tb = one(base)
                tl = one(lisa)
            else:
                tl = one(lisa)
                tb = one(base)
            ratios.append(tl / tb)
            base_times.append(tb)
            times.append(tl)
        out["paired_ratio"] = sorted(ratios)[len(ratios) // 2]  # the upper median, as benches/step.rs
        out["paired_baseline_s"] = statistics.median(base_times)
    elif name == "pretrain":
        tr = Pretrainer(torch, F, ToyModel)
        out["trainable_params"] = sum(p.numel() for p in tr.params)
        timed(tr.step, args.warmup, args.steps)
    elif name in ("prior_pass", "decoder"):
        # As benches/step.rs: fixed t = i*31 % 1000, ids (i % 8, (i+1) % 8), random inputs.
        model = ToyModel("dual+decoder")
        n = c["batch_size"]
        t = torch.tensor([float(i * 31 % 1000) for i in range(n)])
        ids = [torch.tensor([i % 8 for i in range(n)]), torch.tensor([(i + 1) % 8 for i in range(n)])]
        if name == "prior_pass":
            x = torch.randn(n, 3, c["resolution"], c["resolution"])
            with torch.no_grad():
                enc = model.main.encode(x, t, ids)

            def fn():
                with torch.no_grad():
                    model.main.decode(enc, None)
        else:
            lvl = model.hook_level
            h0 = torch.randn(n, c["channels"][lvl], c["resolution"] >> lvl, c["resolution"] >> lvl)

            def fn():
                for p in model.lisa.parameters():
                    p.grad = None
                h = h0.clone().requires_grad_(True)
                o = model.lisa(h, t)
                o.backward(torch.full_like(o, 1e-3))

        timed(fn, args.warmup, args.steps)
    elif name == "sample":
        model = ToyModel("dual")  # inference builds no decoder
        data = Data(torch, c, seed=1)
        _img, hint, ids = data.circles(c["sample_images"])
        # warm-up: a few denoising steps (a full extra run would double the cost)
        for _ in range(max(args.warmup, 1)):
            sample(torch, model, data, hint, ids, c, steps=2)
        sync()
        out["rss_after_warmup_kib"] = rss_kib()
        for _ in range(args.sample_repeats):
            s = time.perf_counter()
            sample(torch, model, data, hint, ids, c).cpu()  # the images on the host, as lisa's bench
            times.append(time.perf_counter() - s)
    else:
        raise SystemExit(f"unknown measurement {name!r} (known: {', '.join(MEASUREMENTS)})")
    out.update(
        {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "times_s": times,
            "rss_start_kib": rss_start,
            "rss_after_import_kib": rss_import,
            "rss_end_kib": rss_kib(),
            "peak_rss_kib": peak_rss_kib(),
        }
    )
    return out


def environment():
    info = {"python": platform.python_version(), "threads": cpu_threads()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["mkldnn"] = torch.backends.mkldnn.is_available()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        info["torch"] = f"unavailable ({e})"
    return info


def check_prior(path):
    """The torch main network's names and shapes against a lisa-written prior file."""
    import torch

    _t, _F, ToyModel = build_modules()
    shapes, meta = read_safetensors_header(path)
    mine = {f"main.{k}": list(v.shape) for k, v in ToyModel("prior").main.state_dict().items()}
    missing = sorted(set(shapes) - set(mine))
    extra = sorted(set(mine) - set(shapes))
    wrong = sorted(k for k in set(shapes) & set(mine) if shapes[k] != mine[k])
    n_file = sum(math.prod(s) for s in shapes.values())
    print(f"{path}: {len(shapes)} tensors, {n_file} values; torch main: {len(mine)} tensors, "
          f"{sum(math.prod(s) for s in mine.values())} values")
    if "lisa.model_spec" in meta:
        print(f"  its model spec: {meta['lisa.model_spec']}")
    for what, keys in (("missing in torch", missing), ("extra in torch", extra), ("shape differs", wrong)):
        for k in keys:
            print(f"  {what}: {k}")
    ok = not (missing or extra or wrong)
    print("  names and shapes identical" if ok else "  MISMATCH")
    return ok


def param_report():
    import torch  # noqa: F401

    _t, _F, ToyModel = build_modules()
    lisa = lisa_param_counts()
    full = ToyModel("dual+decoder")
    prior = ToyModel("prior")
    torch_counts = {
        "main": sum(p.numel() for p in full.main.parameters()),
        "side": sum(p.numel() for p in full.side.parameters()),
        "decoder": sum(p.numel() for p in full.lisa.parameters()),
    }
    trainable = {
        "baseline": lisa["side"],
        "lisa": lisa["side"] + lisa["decoder"],
        "pretrain": lisa["main"],
    }
    torch_trainable = {
        "baseline": sum(p.numel() for p in ToyModel("dual").parameters() if p.requires_grad),
        "lisa": sum(p.numel() for p in full.parameters() if p.requires_grad),
        "pretrain": sum(p.numel() for p in prior.parameters() if p.requires_grad),
    }
    print("| parameters | lisa | torch |")
    print("|---|---|---|")
    for k in ("main", "side", "decoder"):
        print(f"| {k} | {lisa[k]:,} | {torch_counts[k]:,} |")
    print(f"| total | {sum(lisa.values()):,} | {sum(torch_counts.values()):,} |")
    for k in ("baseline", "lisa", "pretrain"):
        print(f"| trainable, {k} step | {trainable[k]:,} | {torch_trainable[k]:,} |")
    assert lisa == torch_counts, f"parameter counts differ: lisa {lisa} torch {torch_counts}"
    assert trainable == torch_trainable, f"trainable counts differ: {trainable} vs {torch_trainable}"
    return {"lisa": lisa, "torch": torch_counts, "trainable": trainable}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=int(os.environ.get("LISA_BENCH_K", 10)),
                    help="timed steps per measurement, median reported (default 10, env LISA_BENCH_K)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3, as benches/step.rs)")
    ap.add_argument("--sample-repeats", type=int, default=int(os.environ.get("LISA_BENCH_SAMPLE_REPEATS", 3)),
                    help="timed full DDIM-25 runs (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: CPUs available)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    ap.add_argument("--tf32", action="store_true",
                    help="on CUDA, allow TF32 tensor cores in matmuls and convolutions (default: exact f32)")
    ap.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated measurements")
    ap.add_argument("--measure", help="run one measurement in this process and print its JSON")
    ap.add_argument("--json", help="also write every result as JSON to this file")
    ap.add_argument("--check-prior", metavar="SAFETENSORS",
                    help="compare the main network's names/shapes with a lisa-written prior file")
    args = ap.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args)))
        return
    if args.check_prior:
        sys.exit(0 if check_prior(args.check_prior) else 1)

    env = environment()
    env["threads_used"] = args.threads or env["threads"]
    env["f32_matmul"] = "tf32" if args.tf32 else "exact"
    print(f"torch {env.get('torch')}, CPU capability {env.get('torch_cpu_capability')}, "
          f"{args.threads or env['threads']} threads, python {env['python']}"
          + (f", {env['cuda_device']}, f32 matmul {env['f32_matmul']}" if args.device.startswith("cuda") else ""))
    print("configuration: " + json.dumps({k: CONFIG[k] for k in (
        "resolution", "channels", "batch_size", "hook", "lisa_lambda", "sample_steps", "sample_images")}))
    params = param_report()
    results = {}
    for name in [m for m in args.only.split(",") if m]:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", name, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--sample-repeats", str(args.sample_repeats),
               "--threads", str(args.threads), "--device", args.device] + (["--tf32"] if args.tf32 else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            raise SystemExit(f"measurement {name} failed")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results[name] = r
        if "paired_ratio" in r:
            print(f"  {DESCRIPTIONS[name]}: {r['paired_ratio']:.3f} over {len(r['times_s'])} pairs "
                  f"(baseline {r['paired_baseline_s'] * 1e3:.1f} ms, LISA {r['median_s'] * 1e3:.1f} ms)", flush=True)
            continue
        print(f"  {DESCRIPTIONS[name]}: median {r['median_s'] * 1e3:.1f} ms over {len(r['times_s'])}, "
              f"peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB (after import {r['rss_after_import_kib'] / 1024:.0f} MiB)",
              flush=True)
    if "lisa" in results and "baseline" in results:
        print(f"  LISA / baseline = {results['lisa']['median_s'] / results['baseline']['median_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "config": CONFIG, "params": params, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
