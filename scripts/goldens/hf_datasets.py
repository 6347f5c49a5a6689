#!/usr/bin/env python
"""Write the tiny Hugging Face `datasets` fixtures `lisa train --dataset-name` is tested on
(cli/tests/sd_train.rs), with the real `datasets` library, in the layouts users have:

- cli/tests/fixtures/datasets/saved/: `Dataset.save_to_disk` (Arrow IPC stream files,
  state.json, dataset_info.json), columns image, text, conditioning_image (Fill50K's order on
  the hub), images as the `Image` feature (PNG bytes in a struct with a path);
- cli/tests/fixtures/datasets/hub/data/train-00000-of-00001.parquet: the same rows as the Hub
  stores them (Snappy-compressed Parquet), beside a test split that must not be read;
- cli/tests/fixtures/datasets/jpeg/: save_to_disk of JPEG images with other column names
  (target, prompt, hint).

Three rows of 16×16 pictures: a filled circle (image) and its outline (conditioning_image).

Usage: python scripts/goldens/hf_datasets.py  (needs `pip install datasets pillow`)
"""

import io
import pathlib
import shutil

import datasets
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

OUT = pathlib.Path(__file__).resolve().parents[2] / "cli/tests/fixtures/datasets"
PROMPTS = ["red circle with blue background", "green circle with yellow background", "a purple ring"]


def pictures(i):
    image = Image.new("RGB", (16, 16), (30 * i, 40, 200))
    ImageDraw.Draw(image).ellipse((3 + i, 3, 12, 12), fill=(220, 30 * i, 20))
    outline = Image.new("RGB", (16, 16), (0, 0, 0))
    ImageDraw.Draw(outline).ellipse((3 + i, 3, 12, 12), outline=(255, 255, 255))
    return image, outline


def rows():
    out = {"image": [], "text": [], "conditioning_image": []}
    for i, prompt in enumerate(PROMPTS):
        image, outline = pictures(i)
        out["image"].append(image)
        out["text"].append(prompt)
        out["conditioning_image"].append(outline)
    return out


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "conditioning_image": datasets.Image()}
    )
    ds = datasets.Dataset.from_dict(rows(), features=features)
    ds.save_to_disk(str(OUT / "saved"))
    (OUT / "hub/data").mkdir(parents=True)
    # Snappy, pyarrow's default codec, as most Parquet files on the Hub are written.
    pq.write_table(ds.data.table, OUT / "hub/data/train-00000-of-00001.parquet", compression="snappy")
    ds.select([0]).to_parquet(str(OUT / "hub/data/test-00000-of-00001.parquet"))
    jpeg = {"target": [], "prompt": [], "hint": []}
    for i, prompt in enumerate(PROMPTS):
        image, outline = pictures(i)
        for key, picture in [("target", image), ("hint", outline)]:
            encoded = io.BytesIO()
            picture.save(encoded, format="JPEG", quality=95)
            jpeg[key].append({"bytes": encoded.getvalue(), "path": f"{key}-{i}.jpg"})
        jpeg["prompt"].append(prompt)
    features = datasets.Features(
        {"target": datasets.Image(), "prompt": datasets.Value("string"), "hint": datasets.Image()}
    )
    datasets.Dataset.from_dict(jpeg, features=features).save_to_disk(str(OUT / "jpeg"))
    print(f"datasets {datasets.__version__}: wrote {OUT}")


if __name__ == "__main__":
    main()
