#!/usr/bin/env python3
"""Keep learning on the device: watch an inbox folder (or a camera), learn, retrain, predict.

    python personalize.py --bundle /opt/edgetl/models/flowers --inbox ~/inbox
    python personalize.py --bundle ... --inbox ~/inbox --once         # one pass, then exit
    python personalize.py --bundle ... --inbox ~/inbox --camera       # also classify camera frames

Inbox: put photos to learn in inbox/<label>/, photos to classify in inbox/unlabelled/.
Predictions are appended to predictions.jsonl (one JSON object per photo). Retrains the head
after every --retrain-every new samples. Needs only `pip install edgetl[device]`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from edgetl.device import HeadTrainConfig, Learner
from edgetl.device.inbox import copy_to_inbox, ensure_layout, process_inbox
from edgetl.errors import EdgetlError
from edgetl.formats import BACKENDS

log = logging.getLogger("edgetl")


def open_camera(index: int = 0):
    """A function returning one RGB frame as a JPEG file path, from picamera2 or OpenCV."""
    try:
        from picamera2 import Picamera2  # Raspberry Pi camera

        cam = Picamera2()
        cam.configure(cam.create_still_configuration(main={"size": (640, 480)}))
        cam.start()

        def grab(path: Path) -> Path:
            cam.capture_file(str(path))
            return path

        return grab
    except ImportError:
        pass
    try:
        import cv2  # any USB camera

        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            raise SystemExit(f"camera {index} could not be opened")

        def grab(path: Path) -> Path:
            ok, frame = cap.read()
            if not ok:
                raise EdgetlError("the camera returned no frame")
            cv2.imwrite(str(path), frame)
            return path

        return grab
    except ImportError:
        raise SystemExit("--camera needs picamera2 (Raspberry Pi OS: apt install python3-picamera2) or opencv-python") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder or .zip from 'edgetl export'")
    p.add_argument("--store", default=None, help="sample store file (default $EDGETL_HOME/<bundle>.sqlite)")
    p.add_argument("--inbox", required=True, type=Path, help="inbox folder (created if missing)")
    p.add_argument("--predictions", type=Path, default=None, help="JSON-lines output (default INBOX/predictions.jsonl)")
    p.add_argument("--retrain-every", type=int, default=10, help="retrain after this many new samples")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between inbox scans")
    p.add_argument("--once", action="store_true", help="process the inbox once and exit")
    p.add_argument("--camera", action="store_true", help="also classify a camera frame every --interval seconds")
    p.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help="backbone runtime (default: the bundle's preferred backbone file)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: all cores)")
    p.add_argument("--epochs", type=int, default=HeadTrainConfig().epochs,
                   help="at most this many solver iterations (Adam: full-batch steps) per training")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        learner = Learner.open(a.bundle, store=a.store, backend=a.backend, threads=a.threads)
    except EdgetlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ensure_layout(a.inbox)
    predictions = a.predictions or a.inbox / "predictions.jsonl"
    cfg = HeadTrainConfig(epochs=a.epochs)
    grab = open_camera() if a.camera else None
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("watching %s with %s (head version %s)", a.inbox, learner.backbone_entry["file"],
             learner.store.active_version())
    pending = 0
    while not stop:
        if grab is not None:
            with tempfile.TemporaryDirectory() as tmp:
                copy_to_inbox(grab(Path(tmp) / f"frame-{int(time.time() * 1000)}.jpg"), a.inbox, None)
        r = process_inbox(learner, a.inbox, predictions, a.retrain_every, pending, cfg)
        pending = r["pending"]
        if any(r[k] for k in ("learned", "classified", "rejected", "retrained")):
            log.info("learned %(learned)d, classified %(classified)d, rejected %(rejected)d, retrained %(retrained)d", r)
        if a.once:
            if pending:
                learner.train(cfg)
                log.info("retrained on the last %d sample(s)", pending)
            break
        time.sleep(a.interval)
    learner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
