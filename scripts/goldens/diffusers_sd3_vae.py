#!/usr/bin/env python
"""Golden fixture for lisa's AutoencoderKL in SD3's form: 16 latent channels, no quant_conv or
post_quant_conv, latents (mean - shift_factor) * scaling_factor and images decoded from
latents / scaling_factor + shift_factor, as train_controlnet_sd3.py and StableDiffusion3Pipeline
use them.

Writes trainer/tests/fixtures/sd3/vae/: vae/ (a diffusers folder, random weights) and
io.safetensors: `image` [2, 3, 16, 16] in [-1, 1], `latents` (the posterior mean, shifted and
scaled) and `decoded` (the images of `latents`, through the pipeline's unscale and unshift).

Usage: python scripts/goldens/diffusers_sd3_vae.py [--out trainer/tests/fixtures/sd3/vae]
"""

import argparse
import os
import sys

import torch

import diffusers
from diffusers import AutoencoderKL

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import write_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "trainer", "tests", "fixtures", "sd3", "vae"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(4100)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    for name, p in vae.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    vae.save_pretrained(os.path.join(args.out, "vae"))
    image = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    c = vae.config
    latents = (vae.encode(image).latent_dist.mean - c.shift_factor) * c.scaling_factor
    decoded = vae.decode(latents / c.scaling_factor + c.shift_factor).sample
    meta = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    write_safetensors(
        os.path.join(args.out, "io.safetensors"), {"image": image, "latents": latents, "decoded": decoded}, meta
    )
    print(f"latents {tuple(latents.shape)}, decoded {tuple(decoded.shape)}")


if __name__ == "__main__":
    main()
