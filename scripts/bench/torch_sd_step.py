#!/usr/bin/env python3
"""PyTorch + diffusers side of the SD-size ControlNet training step (lisa's side:
trainer/benches/sd_step.rs). The same work, with diffusers' own models:

- UNet2DConditionModel from SD 1.5's config.json (random weights, frozen), and
  ControlNetModel.from_unet(unet) (trainable), AdamW on the ControlNet (lr 1e-5, wd 1e-2);
- inputs: latents [b, 4, 64, 64] used as the noisy input, noise as the target, timestep 500,
  a [b, 3, 512, 512] condition image of 0.5, text embeddings [b, 77, 768];
- baseline: ControlNet -> UNet with the residuals -> MSE(pred, noise) -> backward -> AdamW;
- lisa: the same, plus the prior (the UNet without residuals, no grad), the LISA decoder on the
  input of controlnet_down_blocks[5] (`down_5`, as lisa hooks it) and 0.2 * MSE(decoded,
  noise - prior); the decoder is trained too. diffusers cannot run the UNet's decoder alone,
  so the prior is a whole UNet pass here, where lisa reuses the encoder's activations;
- sample: DDIM with the ControlNet, no guidance.

Attention runs through diffusers' default processor (torch's scaled_dot_product_attention).
`--dtype bf16|fp16` runs the step under torch.autocast with fp32 master weights, as accelerate's
`--mixed_precision` does (fp16 with a GradScaler). Prints one line per arm and, with --json,
writes the figures. Peak memory: the process's peak RSS on the CPU (run one arm per process for
per-arm figures), torch.cuda.max_memory_allocated per arm on a GPU.

  python scripts/bench/torch_sd_step.py --steps 2 --arms baseline
  python scripts/bench/torch_sd_step.py --device cuda --dtype bf16 --batch 4 --arms baseline,lisa,sample
"""

import argparse
import json
import math
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# SD 1.5's UNet config.json, the keys that differ from diffusers' defaults (as sd_step.rs).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
HOOK = 5  # down_5: the input of controlnet_down_blocks[5], [b, 640, 32, 32]
LISA_WEIGHT = 0.2


def sinusoidal(t, dim):
    """[n] -> [n, dim]: cos then sin of t / 10000^(i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class LisaDecoder(nn.Module):
    """lisa's decoder (trainer/src/model/decoder.rs): h + time projection, SiLU, one stage per
    x2 of resolution (halving the channels down to the floor; a 1x1 first conv from >= 512
    channels), nearest upsampling before the next conv, a zero-initialised 3x3 output conv."""

    def __init__(self, c_h, r_h, out_channels, out_res, time_dim=256, floor=64):
        super().__init__()
        k = int(math.log2(out_res // r_h))
        self.time_dim = time_dim
        self.time_proj = nn.Linear(time_dim, c_h)
        self.convs = nn.ModuleList()
        self.upsample = []
        ch = c_h
        if k == 0:
            self.convs.append(nn.Conv2d(ch, ch, 3, padding=1))
            self.upsample.append(False)
        for i in range(k):
            nxt = max(ch // 2, min(floor, ch))
            kernel = 1 if i == 0 and ch >= 512 else 3
            self.convs.append(nn.Conv2d(ch, nxt, kernel, padding=kernel // 2))
            self.upsample.append(True)
            ch = nxt
        self.out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h, t):
        e = self.time_proj(sinusoidal(t, self.time_dim).to(h.dtype))
        x = F.silu(h + e[:, :, None, None])
        pending = False
        for conv, up in zip(self.convs, self.upsample):
            if pending:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.silu(conv(x))
            pending = up
        if pending:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.out(x)


def peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["f32", "bf16", "fp16"], default="f32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per arm (after --warmup)")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--arms", default="baseline,lisa", help="comma list of baseline, lisa, sample")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--sample-images", type=int, default=4)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--tiny", action="store_true", help="a tiny UNet (checks the script in seconds)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast_dtype = {"f32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = dict(SD15_UNET)
    side, tokens, width = 64, 77, 768
    if args.tiny:
        config.update(block_out_channels=[32, 32, 64, 64], attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8)
        side, width = 16, 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device)
    unet.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet).to(device)
    controlnet.train()
    if args.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e9
    n_cn = sum(p.numel() for p in controlnet.parameters()) / 1e9
    print(
        f"torch_sd_step: torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
        + f", {args.dtype}, batch {args.batch}, {side}x{side} latents, {tokens} tokens"
        + f"; UNet {n_unet:.3f} B, ControlNet {n_cn:.3f} B parameters"
    )

    hooked = {}
    controlnet.controlnet_down_blocks[HOOK].register_forward_pre_hook(lambda _m, inputs: hooked.__setitem__("h", inputs[0]))
    hook_channels = controlnet.controlnet_down_blocks[HOOK].in_channels
    hook_side = side // 2  # down_5 is after the first downsampling
    b = args.batch

    def inputs(s):
        g = torch.Generator(device="cpu").manual_seed(s)
        x = torch.randn(b, 4, side, side, generator=g).to(device)
        noise = torch.randn(b, 4, side, side, generator=g).to(device)
        ctx = torch.randn(b, tokens, width, generator=g).to(device)
        hint = torch.full((b, 3, 8 * side, 8 * side), 0.5, device=device)
        t = torch.full((b,), 500, device=device, dtype=torch.long)
        return x, noise, ctx, hint, t

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    results = {}
    for arm in [a.strip() for a in args.arms.split(",") if a.strip()]:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        if arm in ("baseline", "lisa"):
            lisa = arm == "lisa"
            params = list(controlnet.parameters())
            decoder = None
            if lisa:
                decoder = LisaDecoder(hook_channels, hook_side, 4, side).to(device)
                params += list(decoder.parameters())
            opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
            scaler = torch.amp.GradScaler(device.type) if args.dtype == "fp16" else None
            for s in range(args.warmup + args.steps):
                x, noise, ctx, hint, t = inputs(10 + s)
                sync()
                start = time.perf_counter()
                with autocast():
                    down, mid = controlnet(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
                    pred = unet(
                        x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid,
                    ).sample
                    loss = F.mse_loss(pred.float(), noise)
                    if lisa:
                        with torch.no_grad():
                            prior = unet(x, t, encoder_hidden_states=ctx).sample
                        decoded = decoder(hooked["h"], t)
                        loss = loss + LISA_WEIGHT * F.mse_loss(decoded.float(), (noise - prior.float()))
                hooked.clear()
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                opt.zero_grad(set_to_none=True)
                del down, mid, pred, loss
                sync()
                if s >= args.warmup:
                    times.append(time.perf_counter() - start)
            del opt, decoder
        elif arm == "sample":
            sched = DDIMScheduler(
                num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1,
            )
            n = args.sample_images
            g = torch.Generator(device="cpu").manual_seed(1)
            ctx = torch.randn(n, tokens, width, generator=g).to(device)
            hint = torch.full((n, 3, 8 * side, 8 * side), 0.5, device=device)
            for s in range(args.warmup + args.steps):
                sched.set_timesteps(args.sample_steps)
                lat = torch.randn(n, 4, side, side, generator=g).to(device)
                sync()
                start = time.perf_counter()
                with torch.no_grad(), autocast():
                    for tt in sched.timesteps:
                        t = tt.expand(n).to(device)
                        down, mid = controlnet(lat, t, encoder_hidden_states=ctx, controlnet_cond=hint, return_dict=False)
                        eps = unet(
                            lat, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid,
                        ).sample
                        lat = sched.step(eps.float(), tt, lat).prev_sample
                sync()
                if s >= args.warmup:
                    times.append(time.perf_counter() - start)
        else:
            sys.exit(f"unknown arm {arm!r} (baseline, lisa, sample)")
        times_sorted = sorted(times)
        median = times_sorted[len(times_sorted) // 2]
        peak = peak_gib(device)
        label = "peak GPU memory" if device.type == "cuda" else "peak RSS"
        print(f"  {arm:<8} step {median:8.2f} s (median of {len(times)}; all: {[f'{t:.2f}' for t in times]}), {label} {peak:.2f} GiB")
        results[arm] = {"median_s": median, "times_s": times, "peak_gib": peak}
    if "baseline" in results and "lisa" in results:
        print(f"  LISA / baseline step time: {results['lisa']['median_s'] / results['baseline']['median_s']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": str(device), "dtype": args.dtype, "batch": b, "arms": results}, f, indent=1)


if __name__ == "__main__":
    main()
