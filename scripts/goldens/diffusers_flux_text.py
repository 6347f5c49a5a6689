#!/usr/bin/env python
"""Golden file for lisa's Flux text side: diffusers' FluxPipeline.encode_prompt over two tiny text
encoders that are already fixtures:

  text_encoder/, tokenizer/      trainer/tests/fixtures/clip/{text_encoder,tokenizer}
                                 (CLIPTextModel, hidden 32, quick_gelu, eos_token_id 713: pooled
                                 at the first end token)
  text_encoder_2/, tokenizer_2/  trainer/tests/fixtures/sd3/text/{text_encoder_3,tokenizer_3}
                                 (T5EncoderModel, d_model 48; the fixture's T5TokenizerFast)

Writes trainer/tests/fixtures/flux/text/io.safetensors: per prompt (meta "prompts", JSON) the
pipeline's prompt_embeds [n, 16, 48] (T5's last hidden state, max_sequence_length 16, so the long
prompt is cut), pooled_prompt_embeds [n, 32] (the CLIPTextModel's pooler_output: the final-layer-
normed state at the end token, no projection), text_ids [16, 3] (zeros), and for debugging each
tokenizer's ids as the pipeline makes them (clip_input_ids [n, 77], t5_input_ids [n, 16], as f32).

Usage: python scripts/goldens/diffusers_flux_text.py [--out trainer/tests/fixtures/flux/text]
"""

import argparse
import json
import os
import sys

import torch

import diffusers
import transformers
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import write_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "trainer", "tests", "fixtures")
MAX_SEQUENCE_LENGTH = 16

# The prompts of diffusers_sdxl_text.py.
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
    ap.add_argument("--out", default=os.path.join(FIXTURES, "flux", "text"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)

    tok_1 = CLIPTokenizer.from_pretrained(os.path.join(FIXTURES, "clip", "tokenizer"))
    tok_2 = T5TokenizerFast.from_pretrained(os.path.join(FIXTURES, "sd3", "text", "tokenizer_3"))
    clip = CLIPTextModel.from_pretrained(os.path.join(FIXTURES, "clip", "text_encoder")).eval()
    t5 = T5EncoderModel.from_pretrained(os.path.join(FIXTURES, "sd3", "text", "text_encoder_3")).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=clip,
        tokenizer=tok_1,
        text_encoder_2=t5,
        tokenizer_2=tok_2,
        transformer=None,
    )
    io = {}
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=PROMPTS, prompt_2=None, device="cpu", max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        io["prompt_embeds"] = embeds
        io["pooled_prompt_embeds"] = pooled
        io["text_ids"] = text_ids
        # The ids as _get_clip_prompt_embeds / _get_t5_prompt_embeds make them.
        clip_ids = tok_1(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t5_ids = tok_2(
            PROMPTS, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        io["clip_input_ids"] = clip_ids.float()
        io["t5_input_ids"] = t5_ids.float()
        # The pipeline's computation, written out.
        assert torch.equal(pooled, clip(clip_ids).pooler_output)
        assert torch.equal(embeds, t5(t5_ids)[0])
        assert torch.equal(text_ids, torch.zeros(MAX_SEQUENCE_LENGTH, 3))
    for k, v in io.items():
        assert torch.isfinite(v).all(), k
    for name, tok, n in [("clip", tok_1, 77), ("t5", tok_2, MAX_SEQUENCE_LENGTH)]:
        for i, p in enumerate(PROMPTS):
            full = len(tok(p).input_ids)
            print(f"  {name} prompt {i}: {full} tokens{' (truncated to %d)' % n if full > n else ''}")
    meta = {
        "prompts": json.dumps(PROMPTS),
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }
    write_safetensors(os.path.join(args.out, "io.safetensors"), io, meta)
    for k, v in io.items():
        print(f"  {k:22s} {tuple(v.shape)}")


if __name__ == "__main__":
    main()
