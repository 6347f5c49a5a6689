#!/usr/bin/env python
"""Print the parameter counts diffusers gives SD 1.5's and SDXL's UNet and a ControlNet made
from each, and FLUX.1-dev's transformer with a ControlNet made from it (4 + 4 blocks, as
train_controlnet_flux.py) and a union ControlNet (10 modes), and SD3-medium's and SD3.5-large's
transformers with a ControlNet of 12 blocks made from each (train_controlnet_sd3.py) (random
weights on torch's meta device: nothing is downloaded or allocated). The numbers pin
`UNetConfig::parameter_estimate` in trainer/tests/sd_model.rs, `FluxConfig::parameter_count` in
trainer/tests/flux_model.rs and `Sd3Config::parameter_count` in trainer/tests/sd3_parity.rs
(the memory checks before a run), whose configs are these. For SD3 the count is of the weights
file: the parameters and the stored sin-cos position table (`pos_embed.pos_embed`, a buffer).

Usage: python scripts/goldens/diffusers_parameter_counts.py
"""

import diffusers
import torch

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, norm_num_groups=32,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
)

# black-forest-labs/FLUX.1-dev's transformer/config.json.
FLUX_DEV = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)

# stabilityai/stable-diffusion-3-medium-diffusers' transformer/config.json.
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
# stabilityai/stable-diffusion-3.5-large's transformer/config.json.
SD35_LARGE = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
    joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192, qk_norm="rms_norm",
)


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    for name, cfg in [("sd15", SD15), ("sdxl", SDXL)]:
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**cfg)
            side = {k: v for k, v in cfg.items() if k not in ("out_channels", "up_block_types", "sample_size")}
            controlnet = diffusers.ControlNetModel(**side)
        print(f"{name}: unet {count(unet)} controlnet {count(controlnet)} (diffusers {diffusers.__version__})")
    with torch.device("meta"):
        transformer = diffusers.FluxTransformer2DModel(**FLUX_DEV)
        controlnet = diffusers.FluxControlNetModel.from_transformer(transformer, num_layers=4, num_single_layers=4)
        side = {k: v for k, v in FLUX_DEV.items() if k != "out_channels"}
        union = diffusers.FluxControlNetModel(**{**side, "num_layers": 4, "num_single_layers": 4, "num_mode": 10})
    print(f"flux-dev: transformer {count(transformer)} controlnet {count(controlnet)} union {count(union)}")
    for name, cfg in [("sd3-medium", SD3_MEDIUM), ("sd35-large", SD35_LARGE)]:
        with torch.device("meta"):
            transformer = diffusers.SD3Transformer2DModel(**cfg)
            # As train_controlnet_sd3.py calls it (from_transformer's own default is 1 extra channel).
            controlnet = diffusers.SD3ControlNetModel.from_transformer(
                transformer, num_layers=12, num_extra_conditioning_channels=0
            )
        in_file = lambda m: count(m) + m.pos_embed.pos_embed.numel()  # noqa: E731
        print(f"{name}: transformer {in_file(transformer)} controlnet {in_file(controlnet)} (weights files)")


if __name__ == "__main__":
    main()
