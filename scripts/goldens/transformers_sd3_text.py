#!/usr/bin/env python
"""Golden fixtures for lisa's SD3 text side: two CLIPTextModelWithProjection, T5EncoderModel, the
T5 tokenizer, and SD3's prompt encoding (diffusers' StableDiffusion3Pipeline.encode_prompt).

Writes trainer/tests/fixtures/sd3/text/ as the text half of an SD3 pipeline folder:

  tokenizer/, tokenizer_2/   the CLIP tokenizer of trainer/tests/fixtures/clip (tokenizer_2 pads
                             with "!", as SD3's CLIP-G tokenizer does)
  tokenizer_3/               a tiny T5 (Unigram) tokenizer made here from a fixed vocabulary of
                             whole words, a few pieces and single characters with fixed scores
                             (T5TokenizerFast files; NFKC stands in for T5's precompiled
                             normaliser, which needs the real model's charsmap)
  text_encoder/              CLIPTextModelWithProjection, quick_gelu, eos_token_id 2 (the legacy
                             pooling: the first position of the largest id, as SD3's CLIP-L config)
  text_encoder_2/            CLIPTextModelWithProjection, gelu, pooling at the first eos_token_id
  text_encoder_3/            T5EncoderModel, gated-gelu, relative position buckets (8 buckets,
                             max distance 16: the logarithmic buckets are used at 24 tokens)
  io.safetensors             per prompt (meta "prompts", JSON): the token ids of the three
                             tokenizers (ids_1, ids_2, ids_3, as f32), each CLIP's penultimate hidden
                             states (clip_1_hidden, clip_2_hidden) and projected pooled output
                             (clip_1_pooled, clip_2_pooled), T5's last hidden state (t5_hidden), and
                             the pipeline's prompt_embeds and pooled_prompt_embeds

Everything is offline (models from configs, random weights), float32, CPU, seeded.

Usage: python scripts/goldens/transformers_sd3_text.py [--out trainer/tests/fixtures/sd3/text]
"""

import argparse
import json
import os
import shutil
import sys

import torch
import tokenizers
from tokenizers import Regex, normalizers, pre_tokenizers, processors, decoders
from tokenizers.models import Unigram

import diffusers
import transformers
from diffusers import StableDiffusion3Pipeline
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusers_sd import write_safetensors  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIP_TOKENIZER = os.path.join(REPO, "trainer", "tests", "fixtures", "clip", "tokenizer")
MAX_SEQUENCE_LENGTH = 24
SEED = 4000

PROMPTS = [
    "a red circle on a blue ground",
    "",
    "a very long prompt about a green square, a yellow triangle and several small circles that goes "
    "on well past the twenty four tokens T5 keeps here",
]

# The T5 fixture's vocabulary: whole words (score -1), pieces that split longer words (-2), and
# the single characters every text falls back to (-5); "T" and "4" are left out, so <unk> is used.
T5_WORDS = "a red circle on blue ground green square yellow triangle several small and the".split()
T5_PIECES = ["ing", "ong", "ver", "pro", "ee", "ll"]
T5_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz,."))


def t5_tokenizer(out):
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS] + [(p, -2.0) for p in T5_PIECES] + [(c, -5.0) for c in T5_CHARS]
    tok = tokenizers.Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    fast = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0, model_max_length=512
    )
    fast.save_pretrained(out)
    return T5TokenizerFast.from_pretrained(out)


@torch.no_grad()
def randomise(model, gen):
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "trainer", "tests", "fixtures", "sd3", "text"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    out = args.out
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(SEED)

    for name in ["tokenizer", "tokenizer_2"]:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        shutil.copytree(CLIP_TOKENIZER, os.path.join(out, name))
    config_2 = os.path.join(out, "tokenizer_2", "tokenizer_config.json")
    with open(config_2) as f:
        c = json.load(f)
    c["pad_token"] = "!"
    with open(config_2, "w") as f:
        json.dump(c, f, indent=2, sort_keys=True)
        f.write("\n")
    tok_1 = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    tok_2 = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer_2"))
    tok_3 = t5_tokenizer(os.path.join(out, "tokenizer_3"))
    vocab = len(tok_1)

    clip_1 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=24,
            num_attention_heads=2,
            num_hidden_layers=3,
            projection_dim=12,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    clip_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=24,
            intermediate_size=40,
            num_attention_heads=3,
            num_hidden_layers=3,
            projection_dim=20,
            hidden_act="gelu",
            bos_token_id=tok_2.bos_token_id,
            eos_token_id=tok_2.eos_token_id,
            pad_token_id=tok_2.pad_token_id,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok_3),
            d_model=48,
            d_kv=8,
            d_ff=40,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    ).eval()
    for m in (clip_1, clip_2, t5):
        randomise(m, gen)
    clip_1.save_pretrained(os.path.join(out, "text_encoder"))
    clip_2.save_pretrained(os.path.join(out, "text_encoder_2"))
    t5.save_pretrained(os.path.join(out, "text_encoder_3"))

    io = {}
    with torch.no_grad():
        for i, (tok, enc) in enumerate([(tok_1, clip_1), (tok_2, clip_2)], start=1):
            ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            o = enc(ids, output_hidden_states=True)
            io[f"ids_{i}"] = ids.float()
            io[f"clip_{i}_hidden"] = o.hidden_states[-2]
            io[f"clip_{i}_pooled"] = o.text_embeds
        ids = tok_3(
            PROMPTS, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        io["ids_3"] = ids.float()
        io["t5_hidden"] = t5(ids)[0]
        pipe = StableDiffusion3Pipeline(
            transformer=None,
            scheduler=None,
            vae=None,
            text_encoder=clip_1,
            tokenizer=tok_1,
            text_encoder_2=clip_2,
            tokenizer_2=tok_2,
            text_encoder_3=t5,
            tokenizer_3=tok_3,
        )
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
        )
        io["prompt_embeds"] = embeds
        io["pooled_prompt_embeds"] = pooled
    # The pipeline's combination, written out: CLIP hidden states side by side, padded to T5's
    # width, then T5's tokens after them; pooled projections side by side.
    clip = torch.cat([io["clip_1_hidden"], io["clip_2_hidden"]], dim=-1)
    clip = torch.nn.functional.pad(clip, (0, io["t5_hidden"].shape[-1] - clip.shape[-1]))
    assert torch.equal(io["prompt_embeds"], torch.cat([clip, io["t5_hidden"]], dim=-2))
    assert torch.equal(io["pooled_prompt_embeds"], torch.cat([io["clip_1_pooled"], io["clip_2_pooled"]], dim=-1))
    meta = {
        "prompts": json.dumps(PROMPTS),
        "max_sequence_length": str(MAX_SEQUENCE_LENGTH),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    write_safetensors(os.path.join(out, "io.safetensors"), io, meta)
    for k, v in io.items():
        print(f"  {k:22s} {tuple(v.shape)}")


if __name__ == "__main__":
    main()
