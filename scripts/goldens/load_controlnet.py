#!/usr/bin/env python
"""Load a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors) with
`<_class_name>.from_pretrained(FOLDER)` (`ControlNetModel`, `SD3ControlNetModel`, ...) and print
its parameter count and config: proves that diffusers accepts a folder (e.g. one written by
lisa). Offline: FOLDER must be a local path.

Usage: python scripts/goldens/load_controlnet.py FOLDER
"""

import json
import os
import sys

import diffusers


def main():
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit(f"usage: {sys.argv[0]} FOLDER (a local folder with config.json)")
    folder = sys.argv[1]
    with open(os.path.join(folder, "config.json")) as f:
        cls = getattr(diffusers, json.load(f).get("_class_name", "ControlNetModel"))
    model = cls.from_pretrained(folder, local_files_only=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {folder}: {type(model).__name__}, {n} parameters, dtype {model.dtype}")
    print(json.dumps(dict(model.config), indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
