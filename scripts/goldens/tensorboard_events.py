#!/usr/bin/env python
"""Write the golden TensorBoard event file that pins lisa's event encoding
(cli/src/tensorboard.rs, test `events_match_tensorboards_writer`): TensorBoard's own protocol
buffers and record writer, wall time fixed at 1.5, holding a file version, a session start at
step 2, the scalars train/loss = 0.5 and train/lr = 1e-5 at step 3, and a 2×1 RGB image (8
stand-in PNG bytes) at step 4.

Usage: python scripts/goldens/tensorboard_events.py  (needs `pip install tensorboard`)
"""

import pathlib

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

OUT = pathlib.Path(__file__).resolve().parents[2] / "cli/tests/fixtures/tensorboard/events.out.tfevents.golden"


def main():
    OUT.parent.mkdir(parents=True, exist_ok=True)
    png = bytes([137, 80, 78, 71, 13, 10, 26, 10])
    events = [
        event_pb2.Event(wall_time=1.5, file_version="brain.Event:2"),
        event_pb2.Event(wall_time=1.5, step=2, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)),
        event_pb2.Event(
            wall_time=1.5,
            step=3,
            summary=summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag="train/loss", simple_value=0.5),
                    summary_pb2.Summary.Value(tag="train/lr", simple_value=1e-5),
                ]
            ),
        ),
        event_pb2.Event(
            wall_time=1.5,
            step=4,
            summary=summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(
                        tag="validation/grid",
                        image=summary_pb2.Summary.Image(height=1, width=2, colorspace=3, encoded_image_string=png),
                    )
                ]
            ),
        ),
    ]
    with open(OUT, "wb") as f:
        writer = RecordWriter(f)
        for e in events:
            writer.write(e.SerializeToString())
        writer.flush()
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
