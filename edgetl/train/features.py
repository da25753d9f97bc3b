"""Pooled backbone features, computed once per image and cached on disk.

The cache is one ``.npz`` per backbone identity (``<cache_dir>/<backbone key>.npz``) that
maps the sha256 of each image file's bytes to its feature. Renaming or moving photos
keeps their features; changing a photo's bytes or the backbone's weights does not.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import preprocess
from ..data import Sample
from ..errors import DataError
from ..fileio import atomic_write_bytes

log = logging.getLogger("edgetl")

Progress = Callable[[str, int, int], None]


class FeatureCache:
    def __init__(self, directory: str | Path, key: str, feature_dim: int):
        self.path = Path(directory) / f"{key}.npz"
        self.feature_dim = feature_dim
        self._data: dict[str, np.ndarray] = {}
        self._dirty = False
        if self.path.exists():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    digests, feats = z["digests"], z["features"]
                if feats.ndim == 2 and feats.shape[1] == feature_dim:
                    self._data = dict(zip(digests.tolist(), feats))
                else:
                    log.warning("ignoring feature cache %s: feature size %s != %s", self.path, feats.shape, feature_dim)
            except Exception as exc:  # a damaged cache is rebuilt, never fatal
                log.warning("ignoring unreadable feature cache %s (%s); it will be rebuilt", self.path, exc)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, digest: str) -> np.ndarray | None:
        return self._data.get(digest)

    def put(self, digest: str, feature: np.ndarray) -> None:
        self._data[digest] = np.asarray(feature, np.float32)
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        digests = np.array(list(self._data.keys()), dtype="U64")
        feats = np.stack(list(self._data.values())).astype(np.float32)
        buf = io.BytesIO()
        np.savez(buf, digests=digests, features=feats)
        atomic_write_bytes(self.path, buf.getvalue())
        self._dirty = False


@dataclass
class Features:
    features: np.ndarray  # (n, d) float32, for the usable samples in order
    labels: np.ndarray  # (n,) int64
    samples: list[Sample]  # the usable samples
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}
    cache_hits: int = 0
    computed: int = 0


def extract_features(
    backbone_model,
    samples: Sequence[Sample],
    spec: preprocess.Preprocessing,
    cache: FeatureCache | None = None,
    *,
    batch_size: int = 32,
    strict: bool = False,
    progress: Progress | None = None,
    stage: str = "features",
    decode_threads: int = 2,
) -> Features:
    """Run the backbone once per image that is not in the cache.

    Each file is read once: its bytes give both the cache key and the decoded pixels; files are
    read and decoded ahead, in ``decode_threads`` threads, while the backbone runs. A file that
    cannot be decoded is skipped with a warning (or raises with ``strict``).
    """
    n = len(samples)
    feats: list[np.ndarray | None] = [None] * n
    skipped: list[dict] = []
    pending_idx: list[int] = []
    pending_px: list[np.ndarray] = []
    pending_digest: list[str] = []
    hits = computed = 0
    done = 0

    def flush():
        nonlocal computed, done
        if not pending_idx:
            return
        x = preprocess.normalize(np.stack(pending_px), spec)
        out = np.asarray(backbone_model.predict_on_batch(x), np.float32)
        for j, i in enumerate(pending_idx):
            feats[i] = out[j]
            if cache is not None:
                cache.put(pending_digest[j], out[j])
        computed += len(pending_idx)
        done += len(pending_idx)
        pending_idx.clear()
        pending_px.clear()
        pending_digest.clear()
        if progress:
            progress(stage, done, n)

    def load(item):  # in a worker thread: read, hash and (for a cache miss) decode
        s = item[1]
        try:
            data, digest = preprocess.read_file_bytes(s.path)
            cached = cache.get(digest) if cache is not None else None
            px = None if cached is not None else preprocess.pixels_from_bytes(data, str(s.path), spec.size)[0]
            return digest, cached, px, None
        except DataError as exc:
            return None, None, None, exc

    # Decoding runs ahead in threads (Pillow releases the GIL) while the backbone runs on a batch.
    with ThreadPoolExecutor(max_workers=decode_threads) as pool:
        for (i, s), (digest, cached, px, exc) in _ahead(pool, load, enumerate(samples), 2 * batch_size):
            if exc is not None:
                if strict:
                    raise DataError(f"{exc} (strict mode: bad files are errors)") from None
                log.warning("skipping %s", exc)
                skipped.append({"file": s.relpath, "reason": str(exc)})
                done += 1
            elif cached is not None:
                feats[i] = cached
                hits += 1
                done += 1
                if progress and done % batch_size == 0:
                    progress(stage, done, n)
            else:
                pending_idx.append(i)
                pending_px.append(px)
                pending_digest.append(digest)
                if len(pending_idx) >= batch_size:
                    flush()
    flush()
    if progress:
        progress(stage, n, n)
    if cache is not None:
        cache.save()
    keep = [i for i in range(n) if feats[i] is not None]
    dim = int(backbone_model.output_shape[-1])
    matrix = np.stack([feats[i] for i in keep]).astype(np.float32) if keep else np.zeros((0, dim), np.float32)
    return Features(
        features=matrix,
        labels=np.array([samples[i].label for i in keep], np.int64),
        samples=[samples[i] for i in keep],
        skipped=skipped,
        cache_hits=hits,
        computed=computed,
    )


def _ahead(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, depth: int) -> Iterator[tuple]:
    """``(item, fn(item))`` in order, each computed in ``pool`` up to ``depth`` items ahead."""
    queue: deque = deque()
    it = iter(items)
    for item in itertools.islice(it, depth):
        queue.append((item, pool.submit(fn, item)))
    while queue:
        item, fut = queue.popleft()
        for nxt in itertools.islice(it, 1):
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, fut.result()
