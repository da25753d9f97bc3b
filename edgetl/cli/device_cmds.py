"""``edgetl device ...`` (also installed as ``edgetl-device``): needs only ``edgetl[device]``."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import socket
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import click

from ..bundle.selftest import describe_cpu
from ..data import expand_images
from ..device.learner import MODES
from ..device.service import Limits
from ..errors import EdgetlError
from ..formats import BACKENDS, PRECISIONS
from ..head.fit import OPTIMIZERS, HeadTrainConfig
from ..head.tflite import config_for
from .common import emit, emit_json, handle_errors, json_option, print_table, report_predictions, setup_logging

TRAINERS = ("numpy", "tflite")


_H = HeadTrainConfig()  # the NumPy trainer's defaults, read (never re-typed) for the help texts
_LIMITS = Limits()  # the service's upload limits, likewise
_PHONE = inspect.signature(config_for).parameters  # the phone trainer's epochs and batch size
_KEYS = ("bundle", "store", "backend", "precision", "threads", "trainer")


def _device_options(at_group: bool):
    """The options every device command needs. They are accepted before the subcommand
    (``edgetl device --bundle B info``) and after it (``edgetl device info --bundle B``)."""
    env = {"bundle": "EDGETL_BUNDLE", "store": "EDGETL_STORE"} if at_group else {}
    return [
        click.option("--bundle", envvar=env.get("bundle"), type=click.Path(path_type=Path), default=None,
                     help="Bundle folder or .zip from 'edgetl export' (env EDGETL_BUNDLE). Required."),
        click.option("--store", envvar=env.get("store"), type=click.Path(path_type=Path), default=None,
                     help="Sample store file (env EDGETL_STORE; default $EDGETL_HOME/<bundle name>.sqlite, "
                          "EDGETL_HOME defaulting to ~/.local/share/edgetl)."),
        click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
                     help="Backbone runtime (default: the file the store was made with, else the bundle's "
                          "preferred backbone file)."),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default=None,
                     help="Which backbone file of the bundle to use (default: as for --backend)."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime threads (default: all cores)."),
        click.option("--trainer", type=click.Choice(list(TRAINERS)), default="numpy" if at_group else None,
                     show_default=at_group,
                     help="Head trainer: NumPy, or the bundle's trainable TFLite head (the phone's path)."),
    ]


def device_command(*args, json_output: bool = True, **kwargs):
    """``@device.command`` for ``fn(ctx, ...)``: it also takes the device options (given after the
    subcommand) and ``--json`` (unless ``json_output=False``), and its errors are reported as
    every command's are (:func:`handle_errors`)."""

    def decorate(fn):
        fn = click.pass_context(handle_errors(fn))
        if json_output:
            fn = json_option(fn)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            ctx = click.get_current_context()
            for k in _KEYS:
                v = kw.pop(k, None)
                if v is not None:
                    ctx.obj[k] = v
            return fn(*a, **kw)

        for opt in reversed(_device_options(at_group=False)):
            wrapper = opt(wrapper)
        return device.command(*args, **kwargs)(wrapper)

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.pass_context
def device(ctx, **options):
    """Keep learning on the device: add photos, retrain the head, predict, roll back.

    Every command needs the bundle (--bundle or EDGETL_BUNDLE); the options below may
    also be given after the command's name.

    \b
    edgetl device --bundle models/flowers add --label mug img1.jpg img2.jpg
    edgetl device --bundle models/flowers train
    edgetl device --bundle models/flowers predict photo.jpg --json
    edgetl device --bundle models/flowers eval photos/ ; edgetl device ... export --out models/mine
    """
    setup_logging()
    ctx.obj = dict(options)


for _opt in _device_options(at_group=True):  # on a built Group, each option is appended in order
    device = _opt(device)


def _learner(ctx, readonly: bool = False):
    """The learner for this command; ``readonly`` for commands that only read the store."""
    from ..device import Learner

    o = ctx.obj
    if o["bundle"] is None:
        raise click.UsageError("Missing option '--bundle' (or the EDGETL_BUNDLE environment variable): "
                               "the bundle folder or .zip written by 'edgetl export'", ctx=ctx)
    return Learner.open(o["bundle"], store=o["store"], backend=o["backend"], precision=o["precision"],
                        threads=o["threads"], trainer=o["trainer"], check=o.get("check", True), readonly=readonly)


@device_command()
def info(ctx, as_json):
    """The bundle, backbone, store, active head and stored samples."""
    d = _learner(ctx, readonly=True).info()
    if as_json:
        emit_json(d)
        return
    for k in ("bundle", "bundle_sha256", "backbone_file", "backend", "store", "head_version", "feature_dim",
              "replay_features"):
        click.echo(f"{k + ':':<17}{d[k]}")
    click.echo(f"{'labels:':<17}{', '.join(d['labels'])}")
    click.echo(f"{'samples:':<17}" + (", ".join(f"{k} {v}" for k, v in d["samples"].items()) or "none"))
    cpu = d["cpu"]
    click.echo(f"{'cpu:':<17}{describe_cpu(cpu)} {cpu['model']}".rstrip())
    last = d["last_check"]
    click.echo(f"{'last check:':<17}" + ("none (the bundle carries no self-test references)" if last is None else
                                        f"{last['file']}: {'passed' if last['ok'] else 'FAILED'}: {last['reason']} "
                                        f"({datetime.fromtimestamp(last['checked']).isoformat(timespec='seconds')})"))


@device_command()
def check(ctx, as_json):
    """Run every model file of the bundle on this CPU against its self-test references.

    Each backbone and classifier file runs on the reference photos the export put into the
    bundle and is compared with the float model (cosine, top-1 agreement) and with what the
    export machine measured. Exit code 1 when a file falls below the export's thresholds.
    """
    ctx.obj["check"] = False  # the command reports a failing file instead of refusing to open
    r = _learner(ctx).check()
    if as_json:
        emit_json(r)
    else:
        click.echo(f"this CPU: {describe_cpu(r['cpu'])}; the export verified on {describe_cpu(r['verified_on'])}")
        rows = [[f["file"], f.get("runtime", ""), {True: "ok", False: "FAILED", None: "not run"}[f["ok"]],
                 f"{f['cosine_mean']:.4f}" if "cosine_mean" in f else "",
                 f"{f['agreement']:.3f}" if "agreement" in f else "", f["reason"]] for f in r["files"]]
        print_table(f"self-test on {r['files'][0].get('photos', '?') if r['files'] else 0} reference photos",
                    ["file", "runtime", "status", "cosine", "agreement", "detail"], rows)
    if not r["ok"]:
        raise SystemExit(1)


@device_command()
@click.option("--label", "-l", required=True, help="The class of these photos (a new name makes a new class).")
@click.argument("images", nargs=-1, required=True)
@click.option("--new-class", is_flag=True, help="Make --label a class of its own even if it differs from an "
              "existing one only in case ('Tulips' beside 'tulips').")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the features.")
def add(ctx, label, images, new_class, dtype, as_json):
    """Store labelled IMAGES (files, folders or glob patterns) as features.

    Unreadable photos are named; the rest are stored.
    """
    r = _learner(ctx).add([str(i) for i in expand_images(list(images))], label, dtype=dtype, new_class=new_class)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"stored {r['stored']} sample(s) of {r['label']!r}"
                   + (f"; {len(r['duplicates'])} already stored" if r["duplicates"] else ""))
        for e in r["errors"]:
            click.echo(f"rejected: {e['error']}", err=True)
    if r["errors"]:
        raise SystemExit(1)


@device_command()
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help=f"Adam/SGD: passes over replay + stored samples; L-BFGS: at most this many iterations "
                   f"(default {_H.epochs}; with --trainer tflite: {_PHONE['epochs'].default}).")
@click.option("--lr", "learning_rate", type=float, default=None,
              help=f"Learning rate (default {_H.learning_rate}; with --trainer tflite: the bundle's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Samples per step (default {_H.batch_size}, i.e. full batch for most stores; with --trainer "
                   f"tflite: {_PHONE['batch_size'].default}).")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=None,
              help=f"Optimizer (default {_H.optimizer}: L-BFGS solved to convergence for a head without hidden "
                   f"layers, in the subspace of the bundle's replay features and the stored photos; else Adam); "
                   f"--trainer tflite uses the bundle's SGD step.")
@click.option("--subspace-dim", type=click.IntRange(min=0), default=_H.subspace_dim, show_default=True,
              help="L-BFGS: principal directions of the replay features to solve in (0: the full feature space, "
                   "several times slower).")
@click.option("--l2", type=float, default=None,
              help=f"L2 weight decay (default {_H.l2}; with --trainer tflite: the bundle's).")
@click.option("--no-balance", is_flag=True, help="Do not weight classes inversely to their sample counts.")
@click.option("--old-class-budget", type=click.FloatRange(0, 1, max_open=True), default=_H.old_class_budget,
              show_default=True,
              help="With classes learned on the device: the most accuracy the bundle's classes may lose on held-back "
                   "replay photos. The new classes get the largest bias within it (a few photos per class otherwise "
                   "leave them under-predicted); a training that loses more even without a bias is kept but not "
                   "activated.")
@click.option("--no-calibrate", is_flag=True, help="No new-class bias and no forgetting check.")
@click.option("--force", is_flag=True, help="Activate the new head even when it fails the forgetting check.")
@click.option("--seed", type=int, default=_H.seed, show_default=True, help="Random seed (sample order).")
def train(ctx, epochs, learning_rate, batch_size, optimizer, subspace_dim, l2, no_balance, old_class_budget,
          no_calibrate, force, seed, as_json):
    """Retrain the head on the stored samples plus the bundle's replay features."""
    learner = _learner(ctx)
    budget = None if no_calibrate else old_class_budget
    given = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    if ctx.obj["trainer"] == "tflite" and learning_rate is None and optimizer is None and l2 is None:
        cfg = replace(config_for(learner.bundle.pick("trainable_head"), seed=seed, **given), old_class_budget=budget)
    else:
        d = HeadTrainConfig()
        cfg = HeadTrainConfig(**given, learning_rate=d.learning_rate if learning_rate is None else learning_rate,
                              optimizer=optimizer or d.optimizer, subspace_dim=subspace_dim,
                              l2=d.l2 if l2 is None else l2, balance=not no_balance, seed=seed,
                              old_class_budget=budget)
    r = learner.train(cfg, force=force)
    if as_json:
        emit_json(r)
        if not r["activated"]:
            raise SystemExit(1)
        return
    click.echo(f"head version {r['version']}: {len(r['labels'])} classes, {r['num_samples']} samples "
               f"({r['stored']} stored + {r['replay']} replay), train accuracy {r['train_accuracy']:.3f}, "
               f"loss {r['final_loss']:.4f}, {r['seconds']:.3f} s")
    if r["new_classes"]:
        click.echo(f"new classes: {', '.join(r['new_classes'])}")
    sv = r.get("solver")
    if sv:
        space = (f"in a {sv['subspace_dim']}-d subspace ({sv['principal']} principal + {sv['from_samples']} from the "
                 "stored photos)" if sv.get("subspace_dim") else "in the full feature space")
        click.echo(f"solver: L-BFGS {space}, L2 {sv['l2']:g}, {sv['iterations']} iterations, "
                   f"{'converged' if sv['converged'] else 'NOT converged'} (largest gradient component "
                   f"{sv['grad_max']:.1e})")
    b = r.get("new_class_bias")
    if b:
        click.echo(f"bundle's classes on {b['held_back_replay']} held-back replay photos: {100 * b['cost']:.1f} points "
                   f"below a head without {', '.join(b['classes'])} (budget {100 * b['budget']:g}); new-class bias "
                   f"{b['bias']:g}")
    if not r["activated"]:
        click.echo(f"head version {r['version']} {r['candidate']}", err=True)
        raise SystemExit(1)
    if r["dropped_classes"]:
        click.echo(f"dropped (no samples left to learn them from): {', '.join(r['dropped_classes'])}", err=True)


@device_command()
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best labels to show per image.")
@click.option("--mode", type=click.Choice(list(MODES)), default="auto", show_default=True,
              help="head: the trained head (scores calibrated on held-back photos); ncm: nearest class mean of "
                   "stored samples and replay (no training needed); auto: while a stored class is not in the head "
                   "yet, the head for its classes and class means for the new ones; ncm when it beat the head on "
                   "the last training's held-back photos; else head.")
@click.option("--unknown-below", type=click.FloatRange(0, 1), default=None,
              help="Answer 'unknown' for a photo whose best score is below this (e.g. 0.5); its best guesses are "
                   "still listed.")
def predict(ctx, images, top_k, mode, unknown_below, as_json):
    """Classify IMAGES (files, folders or glob patterns) with the active head or nearest class mean."""
    r = _learner(ctx, readonly=True).predict([str(i) for i in expand_images(list(images))], top_k=top_k, mode=mode,
                                             unknown_below=unknown_below)
    if not as_json and r.get("mode_reason") and r["mode"] != "head":
        click.echo(f"answered by {r['mode_reason']}", err=True)
    report_predictions(r, as_json)


@device_command("eval")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--mode", type=click.Choice(list(MODES)), default="auto", show_default=True,
              help="head: the active head; ncm: nearest class mean; auto: what 'predict' would use.")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Measure this head version (see 'history') instead of the active one; nothing is activated.")
def eval_cmd(ctx, data_dir, mode, version, as_json):
    """Accuracy on DATA_DIR (one sub-folder per class), for the bundle's classes and the new ones apart."""
    r = _learner(ctx, readonly=True).evaluate(data_dir, mode=mode, version=version)
    if as_json:
        emit_json(r)
        return
    rows = [[label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
            for label, m in r["per_class"].items() if m["support"]]
    print_table(f"{r['model']}: accuracy {r['accuracy']:.4f} on {sum(x[4] for x in rows)} images",
                ["class", "precision", "recall", "f1", "support"], rows)
    for group in ("original_classes", "new_classes"):
        g = r[group]
        if g["num_images"]:
            click.echo(f"{group.replace('_', ' ')}: accuracy {g['accuracy']:.4f} on {g['num_images']} images")
    for s in r["skipped"]:
        click.echo(f"skipped: {s['reason']}", err=True)


@device_command("export")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --out.")
def export_cmd(ctx, out, force, as_json):
    """Write the personalized head, its labels and replay features as a new bundle.

    The new bundle holds the backbone file this store uses; 'edgetl eval/predict' and
    another device open it like any exported bundle.
    """
    r = _learner(ctx, readonly=True).export(out, force=force)
    if as_json:
        emit_json(r)
        return
    click.echo(f"bundle: {r['bundle']} ({r['backbone_file']} + head version {r['head_version']}, "
               f"{len(r['labels'])} classes, {r['replay_samples']} replay samples)")
    if r["left_out"]:
        click.echo(f"left out (their heads are not this device's): {', '.join(r['left_out'])}")


@device_command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the app to.")
@click.option("--force", is_flag=True, help="Replace an existing folder at --out.")
def web(ctx, out, force, as_json):
    """Write the phone app for the bundle: a static folder any web server serves.

    The page runs the bundle's TFLite backbone with LiteRT.js, checks it against the
    bundle's references, and learns new classes in the browser, offline once loaded
    ('edgetl device serve' serves the same app at /phone/).
    """
    from ..device.phone import build_app

    if ctx.obj["bundle"] is None:
        raise click.UsageError("Missing option '--bundle' (or EDGETL_BUNDLE): the bundle to make the app for", ctx=ctx)
    r = build_app(ctx.obj["bundle"], out, force=force)
    if as_json:
        emit_json(r)
        return
    click.echo(f"phone app: {r['app']} ({r['backbone_file']}, {r['files']} files, {r['bytes'] / 1e6:.1f} MB); serve the "
               "folder over HTTPS (or from localhost) and open it on the phone")


@device_command("import")
@click.argument("state", type=click.File("rb"))
def import_cmd(ctx, state, as_json):
    """Add the samples of a phone's exported state (a JSON file from the page) to the store.

    Features only: they must come from the same backbone file as this store's.
    """
    from ..device.phone.sync import import_state

    try:
        doc = json.load(state)
    except (ValueError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"not a JSON document ({exc})", param_hint="STATE") from None
    learner = _learner(ctx)
    try:
        r = import_state(learner, doc)
    finally:
        learner.close()
    emit(r, as_json, f"stored {r['stored']} samples ({r['duplicates']} already there) of {', '.join(r['labels'])}")


@device_command()
def history(ctx, as_json):
    """Head versions, newest last; the active one is marked."""
    h = _learner(ctx, readonly=True).history()
    if as_json:
        emit_json({"versions": h})
        return
    rows = [["*" if v["active"] else "", v["version"], datetime.fromtimestamp(v["created"]).isoformat(timespec="seconds"),
             v["info"].get("origin"), len(v["labels"]),
             f"{v['info']['train_accuracy']:.3f}" if "train_accuracy" in v["info"] else ""] for v in h]
    print_table("head versions", ["active", "version", "created", "origin", "classes", "train acc"], rows)


@device_command()
@click.argument("version", type=click.IntRange(min=1), required=False)
def rollback(ctx, version, as_json):
    """Make head VERSION active again (default: the active head's parent)."""
    r = _learner(ctx).rollback(version)
    emit(r, as_json, f"active head: version {r['version']} ({', '.join(r['labels'])})")


@device_command()
@click.argument("label")
def remove(ctx, label, as_json):
    """Delete a label's samples and stop predicting it (rollback restores the head)."""
    r = _learner(ctx).remove(label)
    emit(r, as_json, f"removed {r['label']!r}: {r['samples_deleted']} sample(s) deleted; active head {r['version']}")


def _lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), for the URL to open on a phone."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed; connect() only picks the interface
            return s.getsockname()[0]
    except OSError:
        return None


def _check_port(host: str, port: int) -> None:
    """Bind the address once before anything starts: a port in use is one line, not uvicorn's log."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EdgetlError(f"port {port} on {host} is in use (another service, or this one already "
                                  "running); stop it or pick another --port") from None
            raise EdgetlError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _token_for(store: Path, host: str, given: str | None) -> tuple[str | None, str]:
    """The token to require: the given one; none on this machine's own address; else the one
    generated at an earlier start (kept beside the store, mode 0600), or a new one."""
    import os

    from ..device.service import LOCAL_HOSTS, new_token

    if given:
        return given, "given"
    if host in LOCAL_HOSTS:
        return None, "none (this machine only)"
    path = store.with_name(store.name + ".token")
    if path.is_file():
        return path.read_text().strip(), f"kept in {path}"
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # readable by this user only
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, f"new; kept in {path} (delete it to make another)"


@device_command(json_output=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 is every network (needs a token).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--token", envvar="EDGETL_TOKEN", default=None,
              help="Access token for the API and the page (env EDGETL_TOKEN). Required off 127.0.0.1: when not "
                   "given, one is generated once, printed, and kept beside the store.")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS certificate (PEM): serve HTTPS, which phone browsers need to open the camera live.")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS private key (PEM).")
@click.option("--max-file-mb", type=click.FloatRange(min=0.1), default=_LIMITS.max_file_bytes / 2**20,
              show_default=True, help="Largest photo accepted per upload.")
@click.option("--max-files", type=click.IntRange(min=1), default=_LIMITS.max_files, show_default=True,
              help="Most photos accepted per upload request.")
@click.option("--max-request-mp", type=click.FloatRange(min=1), default=_LIMITS.max_request_pixels / 1e6,
              show_default=True, help="Decode budget of one request, in megapixels (a JPEG counts at the reduced "
                                      "scale it is decoded at: a 12 MP phone photo costs 0.19 MP); photos past it "
                                      "are refused with 413 before decoding.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A name this device is reached by (Host header), besides its addresses, localhost and its "
                   "hostname: requests naming any other host are refused (DNS rebinding). Repeatable.")
def serve(ctx, host, port, token, certfile, keyfile, max_file_mb, max_files, max_request_mp, allowed_hosts):
    """Serve the HTTP API and the web page that teaches this device from a phone.

    \b
    edgetl device --bundle models/flowers serve                   # http://127.0.0.1:8080/
    edgetl device --bundle models/flowers serve --host 0.0.0.0    # a phone on the same network

    The page (at /) adds classes from the phone's camera or files, trains, predicts live and
    rolls back; docs/service.md lists the API. Stop it with Ctrl-C or SIGTERM: a training in
    progress gets a few seconds to finish, else it is abandoned and nothing of it is saved.
    """
    import uvicorn

    from ..device import Learner
    from ..device.learner import default_store_path
    from ..device.service import check_binding, create_app

    if (certfile is None) != (keyfile is None):
        raise click.UsageError("give both --certfile and --keyfile, or neither", ctx=ctx)
    o = ctx.obj
    if o["bundle"] is None:
        raise click.UsageError("Missing option '--bundle' (or the EDGETL_BUNDLE environment variable)", ctx=ctx)
    from ..bundle import open_bundle

    _check_port(host, port)
    store = o["store"] or default_store_path(open_bundle(o["bundle"]))
    token, origin = _token_for(Path(store), host, token)
    check_binding(host, token)
    # Open once here, so that a bad bundle or store is reported before the server starts.
    Learner.open(o["bundle"], store=store, backend=o["backend"], precision=o["precision"], threads=o["threads"],
                 trainer=o["trainer"]).close()

    def open_learner():
        return Learner.open(o["bundle"], store=store, backend=o["backend"], precision=o["precision"],
                            threads=o["threads"], trainer=o["trainer"])

    limits = Limits(max_file_bytes=int(max_file_mb * 1024 * 1024), max_files=max_files,
                    max_request_pixels=int(max_request_mp * 1e6))
    app = create_app(open_learner, token=token, limits=limits, bind=host, allowed_hosts=tuple(allowed_hosts),
                     on_stop=lambda: click.echo("edgetl: stopped; the sample store is closed"))
    scheme = "https" if certfile else "http"
    shown = _lan_address() if host in ("0.0.0.0", "::") else host
    # The token is printed once: when it is new (or given here), not at every restart.
    fragment = f"#token={token}" if token and (origin == "given" or origin.startswith("new")) else ""
    click.echo(f"edgetl: serving {o['bundle']} with store {store}")
    click.echo(f"  open {scheme}://{shown or host}:{port}/{fragment}")
    click.echo(f"  token: {origin}")
    if scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo("  note: phone browsers open the camera live only over HTTPS (--certfile/--keyfile); over "
                   "plain HTTP the page takes photos with the phone's camera app instead")
    # On SIGTERM/SIGINT uvicorn shuts down gracefully (lifespan: the training job, the store),
    # then re-raises the signal, so the exit status says how it stopped (systemd counts it as clean).
    uvicorn.run(app, host=host, port=port, ssl_certfile=certfile, ssl_keyfile=keyfile, log_level="warning",
                timeout_graceful_shutdown=30)


def main() -> None:  # the edgetl-device console script
    device()
