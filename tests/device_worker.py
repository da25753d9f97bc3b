"""Subprocess for crash and concurrency tests: add photos one call at a time, print ACK <id>.

python -m tests.device_worker BUNDLE STORE LABEL COUNT IMAGE...
"""

from __future__ import annotations

import sys

from edgetl.device import Learner


def main() -> None:
    bundle, store, label, count, *images = sys.argv[1:]
    learner = Learner.open(bundle, store=store, threads=1)
    print("READY", flush=True)
    for i in range(int(count)):
        r = learner.add([images[i % len(images)]], label, skip_duplicates=False)
        for sample_id in r["ids"]:
            print(f"ACK {sample_id}", flush=True)
    learner.close()


if __name__ == "__main__":
    main()
