#!/usr/bin/env python
"""Golden file for lisa's SDXL text side: diffusers' StableDiffusionXLPipeline.encode_prompt over
two tiny text encoders that are already fixtures:

  text_encoder/, tokenizer/      trainer/tests/fixtures/clip/{text_encoder,tokenizer}
                                 (CLIPTextModel, hidden 32, quick_gelu)
  text_encoder_2/, tokenizer_2/  trainer/tests/fixtures/sd3/text/{text_encoder_2,tokenizer_2}
                                 (CLIPTextModelWithProjection, hidden 24, projection 20, gelu,
                                 pads with "!" as SDXL's CLIP-G tokenizer does)

Writes trainer/tests/fixtures/sd/sdxl_text/io.safetensors: per prompt (meta "prompts", JSON) the
pipeline's prompt_embeds [n, 77, 56] (both encoders' penultimate hidden states side by side) and
pooled_prompt_embeds [n, 20] (text_encoder_2's projected pooled output), and each encoder's
penultimate hidden states (clip_1_hidden, clip_2_hidden).

Usage: python scripts/goldens/diffusers_sdxl_text.py [--out trainer/tests/fixtures/sd/sdxl_text]
"""

import argparse
import json
import os
import sys

import torch

import diffusers
import transformers
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import write_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "trainer", "tests", "fixtures")

PROMPTS = [
    "a red circle on a blue ground",
    "",
    "a very long prompt about a green square, a yellow triangle and several small circles that goes "
    "on and on well past the seventy seven tokens that a CLIP tokenizer keeps, so that it is cut: "
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twenty one twenty two twenty three",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(FIXTURES, "sd", "sdxl_text"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    tok_1 = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "clip", "tokenizer"))
    tok_2 = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "sd3", "text", "tokenizer_2"))
    clip_1 = CLIPTextModel.from_pretrained(os.path.join(FIXTURES, "clip", "text_encoder")).eval()
    clip_2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(FIXTURES, "sd3", "text", "text_encoder_2")).eval()
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=clip_1, text_encoder_2=clip_2, tokenizer=tok_1, tokenizer_2=tok_2, unet=None, scheduler=None
    )
    io = {}
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        io["prompt_embeds"] = embeds
        io["pooled_prompt_embeds"] = pooled
        for i, (tok, enc) in enumerate([(tok_1, clip_1), (tok_2, clip_2)], start=1):
            ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            io[f"clip_{i}_hidden"] = enc(ids, output_hidden_states=True).hidden_states[-2]
    # The pipeline's combination, written out.
    assert torch.equal(io["prompt_embeds"], torch.cat([io["clip_1_hidden"], io["clip_2_hidden"]], dim=-1))
    meta = {
        "prompts": json.dumps(PROMPTS),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }
    write_safetensors(os.path.join(args.out, "io.safetensors"), io, meta)
    for k, v in io.items():
        print(f"  {k:22s} {tuple(v.shape)}")


if __name__ == "__main__":
    main()
