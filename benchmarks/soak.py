"""Soak: kill -9 at random points, concurrent writers and readers, and a hostile-input corpus.

Not a test (it runs for many minutes); a campaign with a table and JSON at the end:

    python benchmarks/soak.py                      # ~250 kill trials + concurrency + corpus
    python benchmarks/soak.py --kills 60 --skip-workstation    # a quick pass, no TensorFlow needed
                                                               # (with --bundle B)

It makes the tiny test bundle (MobileNetV2 0.35/96 on 3 flower classes, real weights from
../shared; needs the workstation environment) unless ``--bundle`` is given. Every trial starts
a real process (the device CLI's own Learner, or ``edgetl train``), kills it with SIGKILL at a
random moment within the operation's measured duration, then checks what a user would see:

* the store reopens and passes SQLite's integrity check; every sample whose add was
  acknowledged (its id printed after the commit) is still there (``lost``);
* ``remove``: either the samples are gone AND the active head no longer has the label, or
  neither (``mixed`` otherwise); ``train``/``rollback``: the active head is the old one or a
  complete new one whose labels fit its weights; ``device export --force``: the target is the
  old or the new bundle, and it verifies; workstation ``train --force`` over a 3-class run with
  4 classes: the run folder is all old or all new (run.json, labels.txt, head.npz agree).
* ``tracebacks``: any Python traceback printed by a process that was not killed.

The hostile corpus (built here, not committed) runs every CLI command on bad input and expects
exit code 1 or 2, one ``Error:`` line, no traceback. Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, SHARED, table, write_json  # noqa: E402

ANTS = sorted((SHARED / "datasets/hymenoptera/train/ants").glob("*.jpg"))
BEES = sorted((SHARED / "datasets/hymenoptera/train/bees").glob("*.jpg"))
PY = sys.executable
# The console scripts, as a user runs them (``python -m edgetl.cli.main`` would add a runpy warning).
EDGETL = [str(Path(PY).with_name("edgetl"))] if Path(PY).with_name("edgetl").exists() else [
    PY, "-c", "import sys; from edgetl.cli.main import main; sys.argv[0] = 'edgetl'; main()"]


# -- the worker: one operation in its own process, printing READY / ACK id / DONE ---------------
def worker(op: str, bundle: str, store: str, arg: str) -> None:
    from edgetl.device import HeadTrainConfig, Learner

    learner = Learner.open(bundle, store=store, threads=1, readonly=op == "predict")
    print("READY", flush=True)
    if op == "add":
        label, *images = arg.split("|")
        for i in range(10_000):
            r = learner.add([images[i % len(images)]], label, skip_duplicates=False)
            for sample_id in r["ids"]:
                print(f"ACK {sample_id}", flush=True)
    elif op == "train":
        print(f"DONE {learner.train(HeadTrainConfig())['version']}", flush=True)
    elif op == "remove":
        print(f"DONE {learner.remove(arg)['version']}", flush=True)
    elif op == "rollback":
        print(f"DONE {learner.rollback(int(arg))['version']}", flush=True)
    elif op == "export":
        learner.export(arg, force=True)
        print("DONE", flush=True)
    elif op == "predict":
        for _ in range(10_000):
            learner.predict([ANTS[0]])
            print("READ", flush=True)
    learner.close()


def spawn(op: str, bundle: Path, store: Path, arg: str = "") -> subprocess.Popen:
    return subprocess.Popen([PY, __file__, "worker", op, str(bundle), str(store), arg], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_after(proc: subprocess.Popen, delay: float) -> tuple[str, str, bool]:
    """Wait for READY, sleep ``delay``, SIGKILL; returns stdout, stderr, whether it was killed mid-run."""
    first = proc.stdout.readline()
    if first.strip() != "READY":
        out, err = proc.communicate()
        return first + out, err, False
    time.sleep(delay)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out, err = proc.communicate()
    return out, err, proc.returncode == -signal.SIGKILL


# -- checks -----------------------------------------------------------------------------------------
def store_state(bundle: Path, store: Path) -> dict:
    db = sqlite3.connect(store)
    try:
        ok = db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    from edgetl.device import Learner

    learner = Learner.open(bundle, store=store, threads=1, check=False)
    try:
        head = learner.store.head()
        fits = head.layers[-1][0].shape[1] == len(head.labels)
        return {"integrity": ok, "ids": learner.store.ids(), "counts": learner.store.counts(),
                "version": head.version, "labels": head.labels, "head_fits": fits}
    finally:
        learner.close()


def template_store(bundle: Path, path: Path) -> dict:
    """A store with ants and bees samples and a trained head that knows them (versions 1, 2)."""
    from edgetl.device import HeadTrainConfig, Learner

    learner = Learner.open(bundle, store=path, threads=1)
    learner.add(ANTS[:6], "ants")
    learner.add(BEES[:6], "bees")
    learner.train(HeadTrainConfig())
    learner.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return store_state(bundle, path)


def fresh_copy(template: Path, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    target = where / "store.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copy(template, target)
    return target


def timed(op: str, bundle: Path, store: Path, arg: str) -> float:
    """How long the operation takes after READY, unkilled (the kill window)."""
    proc = spawn(op, bundle, store, arg)
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    t0 = time.perf_counter()
    if op == "add":
        proc.stdout.readline()
        seconds = time.perf_counter() - t0
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return seconds
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{op} failed unkilled: {err[-2000:]}")
    return time.perf_counter() - t0


def kill_campaign(bundle: Path, work: Path, trials: dict[str, int], rng: random.Random) -> list[dict]:
    template = work / "template.sqlite"
    base = template_store(bundle, template)
    rows = []
    images = "|".join(str(p) for p in ANTS[:6])
    for op, n in trials.items():
        if n <= 0:
            continue
        arg = {"add": f"t|{images}", "train": "", "remove": "ants", "rollback": "1",
               "export": str(work / "exported")}[op]
        if op == "export":  # an existing bundle for --force to replace
            spawn("export", bundle, fresh_copy(template, work / "calib"), arg).communicate()
        window = timed(op, bundle, fresh_copy(template, work / "calib"), arg)
        stats = {"operation": op, "trials": 0, "killed_mid_run": 0, "acknowledged": 0, "lost": 0, "mixed": 0,
                 "tracebacks": 0, "window_s": round(window, 3), "problems": []}
        acked: set[int] = set()
        store = fresh_copy(template, work / op)
        for t in range(n):
            if op != "add":
                store = fresh_copy(template, work / op)
            proc = spawn(op, bundle, store, arg)
            # add: several acknowledged adds per trial, then a kill anywhere in the next ones
            out, err, killed = kill_after(proc, rng.uniform(0, (4 if op == "add" else 1.2) * window))
            stats["trials"] += 1
            stats["killed_mid_run"] += killed
            if not killed and "Traceback" in err:
                stats["tracebacks"] += 1
                stats["problems"].append(f"trial {t}: {err.strip().splitlines()[-1]}")
            s = store_state(bundle, store)
            if not s["integrity"] or not s["head_fits"]:
                stats["mixed"] += 1
                stats["problems"].append(f"trial {t}: integrity {s['integrity']}, head fits {s['head_fits']}")
            if op == "add":
                acked |= {int(x.split()[1]) for x in out.splitlines() if x.startswith("ACK ")}
                missing = acked - s["ids"]
                stats["lost"] = len(missing)
            elif op == "remove":
                gone, unlabeled = "ants" not in s["counts"], "ants" not in s["labels"]
                if gone != unlabeled:
                    stats["mixed"] += 1
                    stats["problems"].append(f"trial {t}: samples gone {gone}, head without the label {unlabeled}")
                stats["lost"] += len(base["ids"] - s["ids"]) - (base["counts"]["ants"] if gone else 0)
            else:
                stats["lost"] += len(base["ids"] - s["ids"])
                if op == "rollback" and s["version"] not in (base["version"], 1):
                    stats["mixed"] += 1
                if op == "train" and s["version"] not in (base["version"], base["version"] + 1):
                    stats["mixed"] += 1
                if op == "export":
                    from edgetl.bundle import open_bundle
                    from edgetl.errors import BundleError

                    try:
                        open_bundle(work / "exported").close()
                    except BundleError as exc:
                        stats["mixed"] += 1
                        stats["problems"].append(f"trial {t}: {exc}")
        stats["acknowledged"] = len(acked) if op == "add" else 0
        rows.append(stats)
        print(f"kill -9 {op}: {stats['trials']} trials ({stats['killed_mid_run']} killed mid-run), lost "
              f"{stats['lost']}, mixed {stats['mixed']}, tracebacks {stats['tracebacks']}", flush=True)
    return rows


# -- workstation: train --force over an existing run -----------------------------------------
def run_consistent(run: Path) -> tuple[bool, str]:
    import numpy as np

    try:
        info = json.loads((run / "run.json").read_text())
        labels = (run / "labels.txt").read_text().splitlines()
        with np.load(run / "head.npz") as z:
            last = sorted(k for k in z.files if k.startswith("W"))[-1]
            outputs = z[last].shape[1]
    except (OSError, ValueError, KeyError) as exc:
        return False, f"unreadable: {exc}"
    ok = info["classes"] == labels and outputs == len(labels)
    return ok, f"run.json {len(info['classes'])} classes, labels.txt {len(labels)}, head.npz {outputs} outputs"


def workstation_campaign(work: Path, n: int, rng: random.Random) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import FLOWERS, WEIGHTS_035, copy_photos

    three = copy_photos(FLOWERS / "train", work / "three", ["daisy", "roses", "sunflowers"], 8)
    four = copy_photos(FLOWERS / "train", work / "four", ["daisy", "roses", "sunflowers", "tulips"], 8)
    run = work / "run"
    common = ["--alpha", "0.35", "--size", "96", "--weights", str(WEIGHTS_035), "--epochs", "8", "--force"]
    edgetl = [*EDGETL, "train"]
    subprocess.run([*edgetl, str(three), "--out", str(run), *common], check=True, capture_output=True, cwd=ROOT)
    t0 = time.perf_counter()
    subprocess.run([*edgetl, str(four), "--out", str(run), *common], check=True, capture_output=True, cwd=ROOT)
    window = time.perf_counter() - t0
    stats = {"operation": "workstation train --force", "trials": 0, "killed_mid_run": 0, "acknowledged": 0,
             "lost": 0, "mixed": 0, "tracebacks": 0, "window_s": round(window, 3), "problems": []}
    for t in range(n):
        data = three if t % 2 else four  # alternate, so every trial replaces a run of the other shape
        proc = subprocess.Popen([*edgetl, str(data), "--out", str(run), *common], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(rng.uniform(0.3 * window, 1.1 * window))  # the writes happen at the end
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, err = proc.communicate()
        stats["trials"] += 1
        stats["killed_mid_run"] += proc.returncode == -signal.SIGKILL
        if proc.returncode not in (0, -signal.SIGKILL) or (proc.returncode == 0 and "Traceback" in err):
            stats["tracebacks"] += "Traceback" in err
        ok, what = run_consistent(run)
        if not ok:
            stats["mixed"] += 1
            stats["problems"].append(f"trial {t}: {what}")
    print(f"kill -9 workstation train --force: {stats['trials']} trials ({stats['killed_mid_run']} killed mid-run), "
          f"mixed {stats['mixed']}", flush=True)
    return stats


# -- concurrency ------------------------------------------------------------------------------------
def concurrency(bundle: Path, work: Path) -> dict:
    template = work / "template.sqlite"
    store = fresh_copy(template, work / "concurrent")
    base = store_state(bundle, store)
    images = "|".join(str(p) for p in BEES[:6])
    adders = [spawn("add", bundle, store, f"c{i}|{images}") for i in range(4)]
    reader = spawn("predict", bundle, store)
    trains = []
    acked: list[int] = []
    deadline = time.monotonic() + 60
    for p in adders:
        p.stdout.readline()
    while time.monotonic() < deadline:
        t = spawn("train", bundle, store)
        out, err = t.communicate()
        trains.append((t.returncode, err))
    for p in [*adders, reader]:
        os.killpg(p.pid, signal.SIGKILL)
    outs = [p.communicate() for p in adders]
    r_out, r_err = reader.communicate()
    for out, _ in outs:
        acked += [int(x.split()[1]) for x in out.splitlines() if x.startswith("ACK ")]
    s = store_state(bundle, store)
    failed_trains = [e.strip().splitlines()[-1] for rc, e in trains if rc != 0]
    stats = {"operation": "4 adders + trains + a reader, 60 s", "trials": len(trains), "killed_mid_run": 0,
             "acknowledged": len(acked), "lost": len(set(acked) - s["ids"]),
             "duplicated": len(acked) - len(set(acked)), "mixed": int(not s["integrity"] or not s["head_fits"]),
             "tracebacks": sum("Traceback" in e for _, e in trains) + ("Traceback" in r_err),
             "reads": r_out.count("READ"), "trains_refused": failed_trains[:5], "problems": []}
    assert set(base["ids"]) <= s["ids"]
    print(f"concurrency: {stats['acknowledged']} acknowledged, lost {stats['lost']}, duplicated "
          f"{stats['duplicated']}, {stats['reads']} predicts by a reader, {len(trains)} trains "
          f"({len(failed_trains)} refused)", flush=True)
    return stats


# -- the hostile corpus -----------------------------------------------------------------------
def corpus(bundle: Path, work: Path) -> list[dict]:
    from PIL import Image

    from edgetl.bundle import manifest_digest
    from edgetl.fileio import sha256_file

    c = work / "corpus"
    c.mkdir(parents=True, exist_ok=True)
    photo = ANTS[0].read_bytes()
    files = {
        "truncated.jpg": photo[: len(photo) // 3], "empty.jpg": b"", "text.jpg": b"hello, not a photo\n",
        os.fsdecode(b"latin1 caf\xe9.jpg"): photo,
    }
    for name, data in files.items():
        (c / name).write_bytes(data)
    Image.new("RGB", (9000, 9000), (10, 200, 30)).save(c / "huge.png", optimize=True)
    junk = b"Exif\0\0II*\0\x08\0\0\0\x05\0" + b"\x12\x01\x03\0\xff\xff\xff\x7f\x10\0\0\0" * 5 + b"\0" * 4
    (c / "garbage_exif.jpg").write_bytes(photo[:2] + b"\xff\xe1" + struct.pack(">H", len(junk) + 2) + junk + photo[2:])
    (c / "loop.jpg").unlink(missing_ok=True)
    (c / "loop.jpg").symlink_to(c / "loop.jpg")
    (c / "folder.jpg").mkdir(exist_ok=True)

    def forged(name: str, edit) -> Path:
        b = c / name
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(bundle, b)
        m = json.loads((b / "manifest.json").read_text())
        edit(b, m)
        for e in m["files"]:
            if (b / e["file"]).is_file():
                e["bytes"], e["sha256"] = (b / e["file"]).stat().st_size, sha256_file(b / e["file"])
        m["manifest_sha256"] = manifest_digest(m)
        (b / "manifest.json").write_text(json.dumps(m))
        return b

    def backbone(m):
        return next(e for e in m["files"] if e["role"] == "backbone" and e.get("replay"))

    tampered = c / "tampered"
    shutil.rmtree(tampered, ignore_errors=True)
    shutil.copytree(bundle, tampered)
    m = json.loads((tampered / "manifest.json").read_text())
    (tampered / "manifest.json").write_text(json.dumps({**m, "labels": m["labels"][::-1]}))
    bundles = {
        "labels reordered": tampered,
        "labels reordered, digest fixed": forged("relabel", lambda b, m: m.update(labels=m["labels"][::-1])),
        "replay ../outside.npz": forged("traversal", lambda b, m: backbone(m).update(replay="../outside.npz")),
        "replay /etc/hostname": forged("absolute", lambda b, m: backbone(m).update(replay="/etc/hostname")),
        "swapped backbone": forged("swapped", lambda b, m: shutil.copy(
            b / "trainable_head_fp32.tflite", b / backbone(m)["file"])),
        "replay with a pickle": forged("pickle", lambda b, m: __import__("numpy").savez(
            b / backbone(m)["replay"], features=__import__("numpy").array([{}], dtype=object), labels=[0])),
        "head entry missing": forged("nohead", lambda b, m: m.update(files=[e for e in m["files"]
                                                                            if e["role"] != "head"])),
    }
    bomb = c / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(bundle / "manifest.json", "manifest.json")
        zf.writestr("backbone_int8.tflite", b"\0" * (256 << 20))
    bundles["zip bomb (256 MB of zeros)"] = bomb
    many = c / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(1000):
            zf.writestr(f"f{i}", b"x")
    bundles["zip with 1000 members"] = many
    (c / "notazip.zip").write_bytes(b"PK\x03\x04 not really")
    bundles["not a zip"] = c / "notazip.zip"

    store = work / "corpus.sqlite"
    dev = [*EDGETL, "device", "--bundle", str(bundle), "--store", str(store), "--threads", "1"]
    cases = [(f"add {name}", [*dev, "add", "--label", "ants", str(c / name)]) for name in
             [*files, "huge.png", "garbage_exif.jpg", "loop.jpg", "folder.jpg", "missing.jpg"]]
    cases += [(f"label {label!r}", [*dev, "add", "--label", label, str(ANTS[1])])
              for label in ("a\nb", "\x1b[31mred", "   ", "tab\there")]
    cases += [("rollback 99999999999999999999999", [*dev, "rollback", "99999999999999999999999"]),
              ("rollback -1", [*dev, "rollback", "-1"]), ("remove unknown", [*dev, "remove", "wasps"]),
              ("predict a folder of junk", [*dev, "predict", str(c)])]
    for k, (what, b) in enumerate(bundles.items()):  # train reads all a bundle holds: models, heads, replay
        for step in (["add", "--label", "ants", str(ANTS[3])], ["train"]):
            cases.append((f"bundle: {what} (device {step[0]})", [*EDGETL, "device", "--bundle", str(b), "--store",
                                                                 str(work / f"bundle{k}.sqlite"), *step]))
        cases.append((f"bundle: {what} (edgetl predict)", [*EDGETL, "predict", str(b), str(ANTS[2])]))
    rows = []
    tmp_before = set(Path(tempfile.gettempdir()).glob("edgetl-bundle-*"))
    for what, cmd in cases:
        r = subprocess.run([os.fsencode(x) for x in cmd], capture_output=True, cwd=ROOT, timeout=600)
        err = r.stderr.decode("utf-8", "replace")
        rows.append({"case": what, "exit_code": r.returncode, "traceback": "Traceback" in err,
                     "message": (err.strip().splitlines() or [""])[-1][:300]})
    leaked = set(Path(tempfile.gettempdir()).glob("edgetl-bundle-*")) - tmp_before
    ok = sum(1 for x in rows if not x["traceback"] and x["exit_code"] in (0, 1, 2))
    print(f"hostile corpus: {len(rows)} cases ({sum(x['exit_code'] in (1, 2) for x in rows)} refused with an error, "
          f"{sum(x['exit_code'] == 0 for x in rows)} handled), {sum(x['traceback'] for x in rows)} tracebacks, "
          f"{len(leaked)} extracted zip folders left in {tempfile.gettempdir()}", flush=True)
    return rows, {"cases": len(rows), "clean": ok, "tracebacks": sum(x["traceback"] for x in rows),
                  "leaked_temp_folders": len(leaked)}


def make_bundle(work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import offline_keras_cache
    from tests.helpers import export_device_bundle, make_tiny_data, train_tiny

    offline_keras_cache()
    data = make_tiny_data(work / "data")
    return export_device_bundle(train_tiny(data, work / "run"), work / "bundle")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="a device bundle (default: make the tiny test bundle)")
    ap.add_argument("--kills", type=int, default=220, help="kill -9 trials over add/train/remove/rollback/export")
    ap.add_argument("--workstation-kills", type=int, default=30, help="kill -9 trials of 'edgetl train --force'")
    ap.add_argument("--skip-workstation", action="store_true", help="no TensorFlow: skip the workstation trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = a.bundle or make_bundle(work / "made")
    share = {"add": 0.3, "train": 0.2, "remove": 0.2, "rollback": 0.15, "export": 0.15}
    trials = {op: max(1, round(a.kills * f)) for op, f in share.items()}
    rows = kill_campaign(bundle, work / "kills", trials, rng)
    if not a.skip_workstation and a.workstation_kills:
        rows.append(workstation_campaign(work / "workstation", a.workstation_kills, rng))
    rows.append(concurrency(bundle, work / "kills"))
    corpus_rows, corpus_summary = corpus(bundle, work)
    cols = ["operation", "trials", "killed mid-run", "acknowledged", "lost", "mixed states", "tracebacks"]
    body = [[r["operation"], r["trials"], r["killed_mid_run"], r["acknowledged"], r["lost"], r["mixed"],
             r["tracebacks"]] for r in rows]
    body.append(["hostile corpus", corpus_summary["cases"], "", "", "", "", corpus_summary["tracebacks"]])
    print()
    print(table(cols, body))
    total_kills = sum(r["killed_mid_run"] for r in rows)
    print(f"\n{total_kills} processes killed mid-operation; {sum(r['lost'] for r in rows)} acknowledged samples "
          f"lost; {sum(r['mixed'] for r in rows)} mixed states; "
          f"{sum(r['tracebacks'] for r in rows) + corpus_summary['tracebacks']} tracebacks "
          f"({time.time() - t0:.0f} s)")
    for r in rows:
        for p in r.get("problems", [])[:5]:
            print(f"  {r['operation']}: {p}")
    for x in corpus_rows:
        if x["traceback"] or x["exit_code"] not in (0, 1, 2):
            print(f"  corpus: {x['case']}: exit {x['exit_code']}: {x['message']}")
    path = write_json("soak", {"seed": a.seed, "seconds": round(time.time() - t0, 1), "rows": rows,
                               "corpus": corpus_rows, "corpus_summary": corpus_summary})
    print(f"wrote {path}")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
