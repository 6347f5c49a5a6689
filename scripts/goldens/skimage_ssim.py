#!/usr/bin/env python
"""Print scikit-image's SSIM of the two images `ssim_matches_scikit_image` in
cli/src/control_score.rs builds (a 40×32 ramp and a ring over stripes), with the settings of
Wang et al. 2004 that lisa's control metric uses: the golden value that test pins.

Usage: python scripts/goldens/skimage_ssim.py  (needs `pip install scikit-image`)
"""

import numpy as np
import skimage
from skimage.metrics import structural_similarity


def main():
    w, h = 40, 32
    i = np.arange(w * h)
    a = ((i % w * 7 + i // w * 13) % 256).astype(np.uint8).reshape(h, w)
    x, y = i % w - 20, i // w - 16
    ring = (x * x + y * y >= 64) & (x * x + y * y <= 100)
    b = np.where(ring, 255, (i % w * 5) % 256).astype(np.uint8).reshape(h, w)
    value = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    print(f"scikit-image {skimage.__version__}: ssim = {value!r}")


if __name__ == "__main__":
    main()
