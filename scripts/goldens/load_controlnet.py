#!/usr/bin/env python
"""Load a diffusers ControlNet folder (config.json + diffusion_pytorch_model.safetensors) with
`ControlNetModel.from_pretrained(FOLDER)` and print its parameter count and config: proves that
diffusers accepts a folder (e.g. one written by lisa). Offline: FOLDER must be a local path.

Usage: python scripts/goldens/load_controlnet.py FOLDER
"""

import json
import os
import sys

from diffusers import ControlNetModel


def main():
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit(f"usage: {sys.argv[0]} FOLDER (a local folder with config.json)")
    folder = sys.argv[1]
    model = ControlNetModel.from_pretrained(folder, local_files_only=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"loaded {folder}: {type(model).__name__}, {n} parameters, dtype {model.dtype}")
    print(json.dumps(dict(model.config), indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
