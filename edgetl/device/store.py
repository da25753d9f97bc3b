"""The on-device sample store: SQLite (stdlib) in WAL mode with ``synchronous=FULL``.

* A sample is acknowledged only after its transaction commits; with WAL + FULL the commit is
  on disk, so an acknowledged sample survives ``kill -9`` and power loss, and the database
  always reopens (SQLite recovers the WAL).
* Head versions live in the same database and are written in one transaction together with
  the switch of the active version: a crash leaves either the old or the new head active.
* Writers take the lock with ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout`` for each
  other; a writer that still cannot get the lock gets a :class:`StoreError`, never silent loss.
* Every change that a stale training could undo (a remove, a new or re-activated head) bumps
  ``generation`` in the same transaction. A head trained from a snapshot is saved only if the
  generation is still the snapshot's (:meth:`SampleStore.save_head` with ``expect_generation``):
  a training that started before an acknowledged remove or rollback can never undo it. Adds
  do not bump it: a sample added during a training is kept and learned by the next one, so
  photos arriving all the time cannot starve training.
* ``readonly=True`` opens for reading only: no schema or identity writes, so readers (predict,
  history, info) never wait behind a writer (WAL readers see the last committed state).
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..head.arrays import Layers, head_bytes, head_from_npz

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    feature BLOB NOT NULL,
    dtype TEXT NOT NULL,
    source TEXT,
    sha256 TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_label ON samples(label);
CREATE INDEX IF NOT EXISTS samples_label_sha256 ON samples(label, sha256);
CREATE TABLE IF NOT EXISTS thumbs (
    id INTEGER PRIMARY KEY REFERENCES samples(id) ON DELETE CASCADE,
    jpeg BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS heads (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    labels TEXT NOT NULL,
    weights BLOB NOT NULL,
    info TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class HeadVersion:
    version: int
    created: float
    labels: list[str]
    layers: Layers
    info: dict


class SampleStore:
    def __init__(self, path: str | Path, feature_dim: int, identity: str, busy_timeout_s: float = 30.0,
                 readonly: bool = False):
        """Open (or create) the store; ``identity`` names the backbone file its features came from."""
        self.path = Path(path)
        self.feature_dim = int(feature_dim)
        self.readonly = readonly
        self._layers_cache: dict[tuple[int, float], Layers] = {}
        if readonly:
            self._open_readonly(identity, busy_timeout_s)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            mode = self.db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._check_integrity()
            self._write(lambda c: c.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;"), script=True)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open sample store {self.path}: {exc}") from None
        if mode.lower() != "wal":
            raise StoreError(f"sample store {self.path}: the file system refused WAL mode (got {mode!r})")
        self._check_identity(identity)

    def _open_readonly(self, identity: str, busy_timeout_s: float) -> None:
        if not self.path.is_file():
            raise StoreError(f"no sample store at {self.path} yet")
        try:
            self.db = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self.db.execute("PRAGMA query_only = ON")
            self._check_integrity()
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open sample store {self.path}: {exc}") from None
        self._check_meta(meta, identity)

    def _check_integrity(self) -> None:
        """SQLite's structural check (``quick_check``: every page and index, in one pass) before a
        damaged store is read or written; a few ms for a store of hundreds of photos."""
        rows = [r[0] for r in self.db.execute("PRAGMA quick_check(5)").fetchall()]
        if rows != ["ok"]:
            self.db.close()
            raise StoreError(f"sample store {self.path} is damaged (SQLite: {'; '.join(map(str, rows))[:300]}); "
                             "nothing was read from it: restore it from a backup, or start another with --store")

    @staticmethod
    def backbone_of(path: str | Path) -> str | None:
        """The backbone identity an existing store was made with (read-only; None if no store yet)."""
        p = Path(path)
        if not p.is_file():
            return None
        try:
            db = sqlite3.connect(f"file:{p}?mode=ro", uri=True, timeout=5.0)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'backbone'").fetchone()
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return None  # the normal open reports what is wrong with it
        return row[0] if row else None

    def get_meta(self, key: str) -> str | None:
        return self._meta(key)

    def set_meta(self, key: str, value: str) -> None:
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value)))

    def generation(self) -> int:
        """Bumped by every remove and every change of the active head (not by adds)."""
        return int(self._meta("generation") or 0)

    @staticmethod
    def _bump(c) -> None:
        c.execute("INSERT INTO meta(key, value) VALUES ('generation', '1') "
                  "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    def snapshot(self):
        """A read transaction: every read inside sees one committed state (WAL snapshot)."""
        store = self

        class _Snapshot:
            def __enter__(self):
                store.db.execute("BEGIN")
                return store

            def __exit__(self, *exc):
                if store.db.in_transaction:
                    store.db.execute("COMMIT")

        return _Snapshot()

    # -- plumbing ---------------------------------------------------------------------------
    def _write(self, fn, script: bool = False):
        """Run ``fn(connection)`` in one IMMEDIATE transaction (or as a script)."""
        if self.readonly:
            raise StoreError(f"sample store {self.path} was opened read-only")
        try:
            if script:
                return fn(self.db)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.db)
                self.db.execute("COMMIT")
                return out
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(f"sample store {self.path} is locked by another process and stayed locked; "
                                 "nothing was written, try again") from None
            raise StoreError(f"sample store {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"sample store {self.path}: {exc}") from None

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _check_identity(self, identity: str) -> None:
        def init(c):
            """First open: record what the store's features are; then: read it back."""
            if c.execute("SELECT COUNT(*) FROM meta").fetchone()[0] == 0:
                c.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                    ("schema_version", str(SCHEMA_VERSION)), ("backbone", identity),
                    ("feature_dim", str(self.feature_dim)), ("created", str(time.time())),
                ])
            return dict(c.execute("SELECT key, value FROM meta").fetchall())

        self._check_meta(self._write(init), identity)

    def _check_meta(self, meta: dict, identity: str) -> None:
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise StoreError(f"sample store {self.path} has schema {meta.get('schema_version')}; expected {SCHEMA_VERSION}")
        if meta.get("backbone") != identity or meta.get("feature_dim") != str(self.feature_dim):
            raise StoreError(
                f"sample store {self.path} holds features of backbone {meta.get('backbone', '?')[:16]}... "
                f"(dim {meta.get('feature_dim')}), but this bundle's backbone is {identity[:16]}... "
                f"(dim {self.feature_dim}); use another --store for this bundle"
            )

    def close(self) -> None:
        self.db.close()

    # -- samples ----------------------------------------------------------------------------
    def add(self, features: np.ndarray, label: str, sources: list[str], digests: list[str],
            dtype: str = "float32", skip_duplicates: bool = False,
            thumbs: list[bytes | None] | None = None) -> list[int | None]:
        """Store features of one label in one transaction; returns their ids once committed.

        ``thumbs``: a small JPEG per sample (what the model saw), stored in the same transaction.

        With ``skip_duplicates``, a sample whose label and sha256 are already stored (or that
        repeats one earlier in the same call) is not stored and gets ``None`` in place of an
        id. The check runs inside the write transaction, so two processes adding the same
        photo at once store it once.
        """
        if dtype not in ("float32", "float16"):
            raise StoreError(f"feature dtype must be float32 or float16; received {dtype!r}")
        feats = np.asarray(features, np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise StoreError(f"features of shape {feats.shape} do not fit this store (dim {self.feature_dim})")
        if not (len(sources) == len(digests) == len(feats)) or (thumbs is not None and len(thumbs) != len(feats)):
            raise StoreError(f"{len(feats)} features but {len(sources)} sources, {len(digests)} digests"
                             + ("" if thumbs is None else f" and {len(thumbs)} thumbnails"))
        now = time.time()
        rows = [(label, feats[i].astype(dtype).tobytes(), dtype, sources[i], digests[i], now) for i in range(len(feats))]

        def insert(c):
            ids: list[int | None] = []
            seen: set[str] = set()
            for k, r in enumerate(rows):
                if skip_duplicates and (r[4] in seen or c.execute(
                        "SELECT 1 FROM samples WHERE label = ? AND sha256 = ? LIMIT 1", (label, r[4])).fetchone()):
                    ids.append(None)
                    continue
                seen.add(r[4])
                cur = c.execute("INSERT INTO samples(label, feature, dtype, source, sha256, created) "
                                "VALUES (?, ?, ?, ?, ?, ?)", r)
                ids.append(int(cur.lastrowid))
                if thumbs is not None and thumbs[k] is not None:
                    c.execute("INSERT INTO thumbs(id, jpeg) VALUES (?, ?)", (ids[-1], thumbs[k]))
            return ids

        return self._write(insert) if rows else []

    def samples(self, labels: list[str] | None = None) -> tuple[np.ndarray, list[str], list[int]]:
        """All stored features (float32), their labels and ids, in insertion order."""
        q = "SELECT id, label, feature, dtype FROM samples"
        args: tuple = ()
        if labels is not None:
            q += f" WHERE label IN ({','.join('?' * len(labels))})"
            args = tuple(labels)
        rows = self.db.execute(q + " ORDER BY id", args).fetchall()
        if not rows:
            return np.zeros((0, self.feature_dim), np.float32), [], []
        feats = np.stack([np.frombuffer(r[2], dtype=r[3]).astype(np.float32) for r in rows])
        return feats, [r[1] for r in rows], [int(r[0]) for r in rows]

    def listing(self, label: str | None = None, limit: int = 1000, offset: int = 0) -> list[dict]:
        """Stored samples without their features: id, label, source name, time added, newest first."""
        q = "SELECT s.id, s.label, s.source, s.created FROM samples s"
        args: tuple = ()
        if label is not None:
            q += " WHERE s.label = ?"
            args = (label,)
        rows = self.db.execute(q + " ORDER BY s.id DESC LIMIT ? OFFSET ?", (*args, int(limit), int(offset))).fetchall()
        return [{"id": int(r[0]), "label": r[1], "source": r[2], "added": float(r[3])} for r in rows]

    def thumb(self, sample_id: int) -> bytes | None:
        """The sample's thumbnail JPEG (None: no such sample, or stored without one)."""
        try:
            row = self.db.execute("SELECT jpeg FROM thumbs WHERE id = ?", (int(sample_id),)).fetchone()
        except sqlite3.OperationalError:  # a store from before thumbnails, opened read-only
            return None
        return bytes(row[0]) if row else None

    def remove_sample(self, sample_id: int) -> str | None:
        """Delete one sample (and its thumbnail); returns its label, None if there was no such sample."""

        def remove(c):
            row = c.execute("SELECT label FROM samples WHERE id = ?", (int(sample_id),)).fetchone()
            if row is None:
                return None
            c.execute("DELETE FROM thumbs WHERE id = ?", (int(sample_id),))
            c.execute("DELETE FROM samples WHERE id = ?", (int(sample_id),))
            self._bump(c)  # a training that started before this delete must not save a head that learned it
            return row[0]

        return self._write(remove)

    def rename_label(self, old: str, new: str, new_head: tuple[list[str], Layers, dict] | None = None) -> tuple[int, int | None]:
        """Relabel ``old``'s samples as ``new`` and (optionally) activate ``new_head`` in ONE
        transaction; returns (samples relabelled, the new head's version or None)."""
        blob = head_bytes(new_head[1]) if new_head else None

        def rename(c):
            if c.execute("SELECT 1 FROM samples WHERE label = ? LIMIT 1", (new,)).fetchone():
                raise StoreError(f"a class {new!r} already has samples; pick another name")
            moved = c.execute("UPDATE samples SET label = ? WHERE label = ?", (new, old)).rowcount
            version = self._insert_head(c, new_head[0], blob, new_head[2]) if new_head else None
            self._bump(c)
            return moved, version

        return self._write(rename)

    def ids(self) -> set[int]:
        return {int(r[0]) for r in self.db.execute("SELECT id FROM samples")}

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT label, COUNT(*) FROM samples GROUP BY label ORDER BY MIN(id)").fetchall())

    def remove_label(self, label: str, new_head: tuple[list[str], Layers, dict] | None = None) -> tuple[int, int | None]:
        """Delete the label's samples and (optionally) activate ``new_head`` = (labels, layers,
        info) in ONE transaction; returns (samples deleted, the new head's version or None)."""
        blob = head_bytes(new_head[1]) if new_head else None

        def remove(c):
            c.execute("DELETE FROM thumbs WHERE id IN (SELECT id FROM samples WHERE label = ?)", (label,))
            deleted = c.execute("DELETE FROM samples WHERE label = ?", (label,)).rowcount
            version = self._insert_head(c, new_head[0], blob, new_head[2]) if new_head else None
            self._bump(c)
            return deleted, version

        return self._write(remove)

    # -- heads ------------------------------------------------------------------------------
    def _insert_head(self, c, labels: list[str], blob: bytes, info: dict, activate: bool = True) -> int:
        cur = c.execute("INSERT INTO heads(created, labels, weights, info) VALUES (?, ?, ?, ?)",
                        (time.time(), json.dumps(labels), blob, json.dumps(info)))
        version = int(cur.lastrowid)
        if not activate:
            return version
        c.execute("INSERT INTO meta(key, value) VALUES ('active_head', ?) "
                  "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(version),))
        return version

    def save_head(self, labels: list[str], layers: Layers, info: dict, expect_generation: int | None = None,
                  activate: bool = True) -> int:
        """Store a new head version and make it active, atomically (``activate=False``: keep it
        as a version that 'rollback' can activate; the active head stays).

        With ``expect_generation`` (the generation the head was trained from), the head is saved
        only if nothing changed since; otherwise :class:`StoreError` and nothing is written.
        """
        blob = head_bytes(layers)

        def put(c):
            if expect_generation is not None:
                now = int((c.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone() or [0])[0])
                if now != expect_generation:
                    raise StoreError(
                        f"the sample store changed while this head was trained (a label was removed or another "
                        f"head became active: generation {expect_generation} -> {now}); the new head was "
                        "not saved, so nothing acknowledged is undone; run 'train' again")
            version = self._insert_head(c, labels, blob, info, activate)
            if activate:
                self._bump(c)
            return version

        return self._write(put)

    def _layers(self, version: int, created: float) -> Layers:
        """A version's weights, parsed once per process: a head row is never changed after its
        insert, so (version, created) names its weights for good. Kept read-only, for the last
        few versions asked for (a prediction and a training both start by reading the active head)."""
        key = (version, created)
        layers = self._layers_cache.pop(key, None)
        if layers is None:
            blob = self.db.execute("SELECT weights FROM heads WHERE version = ?", (version,)).fetchone()[0]
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                layers = head_from_npz(z)
            for w, b in layers:
                w.flags.writeable = b.flags.writeable = False
        self._layers_cache[key] = layers  # (most recent last)
        while len(self._layers_cache) > 4:
            self._layers_cache.pop(next(iter(self._layers_cache)))
        return layers

    def head(self, version: int | None = None) -> HeadVersion | None:
        if version is None:
            active = self._meta("active_head")
            if active is None:
                return None
            version = int(active)
        if not 0 < version < 1 << 63:
            raise StoreError(f"head version {version} does not exist; versions are 1, 2, ... (see 'history')")
        row = self.db.execute("SELECT version, created, labels, info FROM heads WHERE version = ?",
                              (version,)).fetchone()
        if row is None:
            raise StoreError(f"no head version {version} in {self.path}; see 'history'")
        return HeadVersion(int(row[0]), float(row[1]), json.loads(row[2]), self._layers(int(row[0]), float(row[1])),
                           json.loads(row[3]))

    def active_version(self) -> int | None:
        v = self._meta("active_head")
        return int(v) if v is not None else None

    def set_active(self, version: int) -> None:
        self.head(version)  # raises when missing

        def activate(c):
            c.execute("UPDATE meta SET value = ? WHERE key = 'active_head'", (str(version),))
            self._bump(c)

        self._write(activate)

    def history(self) -> list[dict]:
        active = self.active_version()
        rows = self.db.execute("SELECT version, created, labels, info FROM heads ORDER BY version").fetchall()
        return [{"version": int(r[0]), "created": float(r[1]), "labels": json.loads(r[2]),
                 "info": json.loads(r[3]), "active": int(r[0]) == active} for r in rows]
