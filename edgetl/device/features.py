"""Photos to backbone features on the device: decoding runs one photo ahead of the backbone."""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import preprocess
from ..errors import ConfigError, DataError
from ..labels import printable


@dataclass(frozen=True)
class Photo:
    """A photo held in memory (e.g. an upload): its bytes and the name to report it by."""

    name: str
    data: bytes

    def __str__(self) -> str:
        return self.name


PhotoLike = str | Path | Photo


@dataclass
class Extracted:
    """The outcome for each input photo, in input order: ``rows[i]`` is its row in ``features``,
    or None when it could not be read (``errors[i]`` then says why)."""

    features: np.ndarray
    rows: list[int | None]
    digests: list[str | None]
    errors: list[str | None]
    thumbs: list[bytes | None]
    names: list[str]

    def kept(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r is not None]


class FeatureExtractor:
    """The backbone's features of photos, one at a time (batch 1, as on the device: a TFLite
    interpreter keeps its tensors allocated). Photos after the first are decoded, resized and
    turned into the model's exact input in a worker thread, up to ``ahead`` photos ahead of the
    backbone (Pillow and the runtimes release the GIL), so decoding hides behind inference and
    memory stays flat however many photos one call gets."""

    def __init__(self, runner, spec: preprocess.Preprocessing, feature_dim: int):
        self.runner, self.spec, self.feature_dim = runner, spec, feature_dim
        self._pool: ThreadPoolExecutor | None = None  # started by the first multi-photo call

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _load(self, photo: PhotoLike, thumbs: bool, min_side: int = 0):
        try:
            if isinstance(photo, Photo):
                px, digest = preprocess.pixels_from_bytes(photo.data, printable(photo.name), self.spec.size, min_side)
            else:
                px, digest = preprocess.load_pixels(photo, self.spec.size, min_side)
        except DataError as exc:
            return None, None, printable(str(exc)), None
        thumb = preprocess.thumbnail_jpeg(px) if thumbs else None
        return self.runner.prepare(px[None], self.spec), digest, None, thumb

    def extract(self, photos: list[PhotoLike], ahead: int = 2, thumbs: bool = False, min_side: int = 0) -> Extracted:
        """``min_side``: refuse photos smaller than this (each gets its error), e.g. for training."""
        if ahead < 1:
            raise ConfigError(f"ahead must be at least 1 photo; received {ahead}")
        photos = list(photos)
        n = len(photos)
        out = Extracted(np.zeros((0, self.feature_dim), np.float32), [None] * n, [None] * n, [None] * n, [None] * n,
                        [str(p) for p in photos])
        feats = []

        def consume(i: int, loaded) -> None:
            x, digest, error, thumb = loaded
            if error is not None:
                out.errors[i] = error
                return
            out.rows[i] = len(feats)
            feats.append(self.runner.run_prepared(x))
            out.digests[i], out.thumbs[i] = digest, thumb

        if n == 1:
            consume(0, self._load(photos[0], thumbs, min_side))
        elif n:
            if self._pool is None:  # one worker for the extractor's life: no thread start per call
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-decode")
            first = self._load(photos[0], thumbs, min_side)  # before the worker starts: the two would contend for the GIL
            pending = deque(self._pool.submit(self._load, p, thumbs, min_side) for p in photos[1 : 1 + ahead])
            try:
                consume(0, first)
                for i in range(1, n):
                    loaded = pending.popleft().result()
                    if i + ahead < n:
                        pending.append(self._pool.submit(self._load, photos[i + ahead], thumbs, min_side))
                    consume(i, loaded)
            finally:  # on an error, let the worker finish what it holds before the caller goes on
                for f in pending:
                    f.cancel()
                wait(pending)
        if feats:
            out.features = np.concatenate(feats).astype(np.float32)
        return out
