"""Prints every scalar of the TensorBoard event files under a directory as JSON, read with the
`tensorboard` package's own reader: {"<run subdirectory>": {"<tag>": [[step, value], ...]}}.

Used by tests/report.rs to check that prefcap's event files are what TensorBoard reads.
Usage: python tensorboard_scalars.py runs/<id>/tensorboard
"""
import json
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(root):
    out = {}
    for sub in sorted(os.listdir(root)):
        acc = EventAccumulator(os.path.join(root, sub), size_guidance={"scalars": 0})
        acc.Reload()
        out[sub] = {
            tag: [[e.step, e.value] for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
