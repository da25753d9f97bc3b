"""Which of a bundle's backbone files a store uses, and whether it computes on this CPU what the
export verified (the bundle's self-test, once per bundle, file and CPU kind)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..bundle import Bundle
from ..bundle.selftest import References, cpu_fingerprint, describe_cpu, verdict
from ..bundle.selftest import measure as measure_self_test
from ..errors import BundleError, EdgetlError, StoreError
from ..formats import FORMATS, MODEL_ROLES
from .store import SampleStore

log = logging.getLogger("edgetl")


def _describe(entry: dict) -> str:
    return f"{entry['file']} (--backend {FORMATS[entry['format']].runtime} --precision {entry.get('precision')})"


def pick_backbone(bundle: Bundle, store_path: Path, backend: str | None, precision: str | None,
                  made_with: str | None) -> dict:
    """The bundle's backbone file for this store (``made_with``: the store's backbone, None if new).

    A store's features come from one backbone file; an existing store keeps using the file it
    was made with unless ``backend``/``precision`` ask for another, which is refused with the
    options that open it.
    """
    origin = next((e for e in bundle.entries("backbone") if e["sha256"] == made_with), None)
    if origin is not None and backend is None and precision is None:
        return origin
    entry = bundle.pick("backbone", backend=backend, precision=precision)
    if made_with is not None and entry["sha256"] != made_with:
        if origin is not None:
            raise StoreError(
                f"sample store {store_path} was made with this bundle's {_describe(origin)}, whose features differ "
                f"from {entry['file']}'s; open it with those options, or use another --store for {entry['file']}")
        raise StoreError(
            f"sample store {store_path} holds features of a backbone this bundle does not have "
            f"({made_with[:16]}...); it belongs to another bundle: use another --store")
    return entry


def check_entry(bundle: Bundle, entry: dict, runner) -> dict:
    """One backbone or classifier file against the bundle's self-test references, on this CPU."""
    refs = References(bundle.root / bundle.manifest["self_test"]["file"])
    head = bundle.head(entry) if entry["role"] == "backbone" else None
    measured = measure_self_test(runner, refs, bundle.preprocessing, entry["role"], head)
    ok, reason = verdict(entry, measured)
    return {"file": entry["file"], "role": entry["role"], "runtime": runner.backend, "ok": ok, "reason": reason,
            **measured, "expected": entry.get("self_test"), "cpu": cpu_fingerprint(), "checked": time.time()}


def first_passing_backbone(bundle: Bundle, entry: dict, runner, threads: int | None):
    """The preferred backbone file if it passes its self-test here, else the next one that does."""
    first = check_entry(bundle, entry, runner)
    if first["ok"]:
        return entry, runner, first
    for other in [e for e in bundle.ranked("backbone") if e is not entry]:
        try:
            r = bundle.open_model(other, threads=threads)
        except EdgetlError:  # its runtime is not installed here
            continue
        result = check_entry(bundle, other, r)
        if result["ok"]:
            log.warning("%s fails its self-test on this CPU (%s); using %s, which passes", entry["file"],
                        first["reason"], other["file"])
            return other, r, result
    return entry, runner, first  # none passes: first_load_check refuses with the first file's numbers


class BackboneCheck:
    """The self-test of the store's backbone file on this CPU, cached in the store."""

    def __init__(self, bundle: Bundle, entry: dict, runner, store: SampleStore):
        self.bundle, self.entry, self.runner, self.store = bundle, entry, runner, store

    def key(self) -> str:
        """Where the result for this bundle, file and CPU kind is kept in the store."""
        return f"self_test:{self.bundle.digest}:{self.entry['file']}:{cpu_fingerprint()['id']}"

    def remember(self, result: dict) -> dict:
        if self.store.readonly:  # a reader does not write; the next writer's open caches it
            return result
        self.store.set_meta(self.key(), json.dumps(result))
        self.store.set_meta("self_test:last", json.dumps(result))
        return result

    def last(self) -> dict | None:
        return json.loads(self.store.get_meta("self_test:last") or "null")

    def first_load(self) -> dict | None:
        """Once per bundle, backbone file and CPU kind: the backbone file against the bundle's
        references. A file below the export's thresholds is refused."""
        if not self.bundle.manifest.get("self_test"):
            return None
        cached = self.store.get_meta(self.key())
        result = json.loads(cached) if cached else self.remember(self.file(self.entry))
        if not result["ok"]:
            others = [e["file"] for e in self.bundle.entries("backbone") if e["file"] != self.entry["file"]]
            raise BundleError(
                f"{self.entry['file']} does not compute on this CPU ({describe_cpu(result['cpu'])}) what "
                f"the export verified on {describe_cpu(self.bundle.manifest['self_test']['verified_on'])}: "
                f"{result['reason']}, on the bundle's {result['photos']} reference photos. Pick another backbone "
                f"file with --backend/--precision" + (f" (this bundle also has {', '.join(others)})" if others else "")
                + "; 'edgetl device check' tests every file of the bundle on this CPU")
        return result

    def file(self, entry: dict) -> dict:
        """Run one backbone or classifier file of the bundle on the references, on this CPU."""
        runner = self.runner if entry is self.entry else self.bundle.open_model(entry, threads=1)
        return check_entry(self.bundle, entry, runner)

    def every_file(self) -> dict:
        """Every backbone and classifier file of the bundle on this CPU (``edgetl device check``)."""
        if not self.bundle.manifest.get("self_test"):
            raise BundleError(f"bundle {self.bundle.source} carries no self-test references (exported by an older "
                              "edgetl, or with --no-verify); re-export it to check it on this device")
        results = []
        for entry in [e for e in self.bundle.files if e["role"] in MODEL_ROLES]:
            try:
                results.append(self.file(entry))
            except EdgetlError as exc:  # e.g. its runtime is not installed here
                results.append({"file": entry["file"], "role": entry["role"], "ok": None, "reason": str(exc)})
        doc = {"bundle": str(self.bundle.source), "cpu": cpu_fingerprint(),
               "verified_on": self.bundle.manifest["self_test"]["verified_on"], "files": results,
               "ok": all(r["ok"] is not False for r in results)}
        mine = next((r for r in results if r["file"] == self.entry["file"]), None)
        if mine is not None and mine["ok"] is not None:
            self.remember(mine)
        return doc
