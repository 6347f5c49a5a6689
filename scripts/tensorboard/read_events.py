#!/usr/bin/env python
"""Read a `lisa train --report-to tensorboard` folder with TensorBoard's own reader
(EventAccumulator, which also applies the session-start purge) and print what TensorBoard
shows: each scalar tag with its (step, value) pairs, each image tag with its steps and sizes.
A manual check that TensorBoard opens lisa's event files; the tests read them in Rust.

Usage: python scripts/tensorboard/read_events.py OUTPUT/logs/train_controlnet
(needs `pip install tensorboard`)
"""

import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    acc = EventAccumulator(sys.argv[1], size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in sorted(tags["scalars"]):
        print(tag, [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)])
    for tag in sorted(tags["images"]):
        print(tag, [(e.step, e.width, e.height, len(e.encoded_image_string)) for e in acc.Images(tag)])


if __name__ == "__main__":
    main()
