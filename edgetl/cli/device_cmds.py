"""``edgetl device ...`` (also installed as ``edgetl-device``): needs only ``edgetl[device]``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click

from .common import emit_json, handle_errors, json_option, print_table, setup_logging


@click.group()
@click.option("--bundle", envvar="EDGETL_BUNDLE", type=click.Path(path_type=Path), default=None,
              help="Bundle folder or .zip (env EDGETL_BUNDLE). Required by every command.")
@click.option("--store", envvar="EDGETL_STORE", type=click.Path(path_type=Path), default=None,
              help="Sample store file (env EDGETL_STORE; default $EDGETL_HOME/<bundle name>.sqlite).")
@click.option("--backend", type=click.Choice(["litert", "tflite_runtime", "onnxruntime"]), default=None,
              help="Backbone runtime (default: the bundle's preferred backbone file).")
@click.option("--precision", default=None, help="Which backbone file of the bundle to use, e.g. int8 or fp32.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime threads (default: all cores).")
@click.option("--trainer", type=click.Choice(["numpy", "tflite"]), default="numpy", show_default=True,
              help="Head trainer: NumPy, or the bundle's trainable TFLite head (the phone's path).")
@click.pass_context
def device(ctx, bundle, store, backend, precision, threads, trainer):
    """Keep learning on the device: add photos, retrain the head, predict, roll back.

    \b
    edgetl device --bundle models/flowers add --label mug img1.jpg img2.jpg
    edgetl device --bundle models/flowers train
    edgetl device --bundle models/flowers predict photo.jpg --json
    """
    setup_logging()
    ctx.obj = {"bundle": bundle, "store": store, "backend": backend, "precision": precision, "threads": threads,
               "trainer": trainer}


def _learner(ctx):
    from ..device import Learner

    o = ctx.obj
    if o["bundle"] is None:
        raise click.UsageError("Missing option '--bundle' (or the EDGETL_BUNDLE environment variable): "
                               "the bundle folder or .zip written by 'edgetl export'", ctx=ctx)
    return Learner.open(o["bundle"], store=o["store"], backend=o["backend"], precision=o["precision"],
                        threads=o["threads"], trainer=o["trainer"])


@device.command()
@json_option
@click.pass_context
@handle_errors
def info(ctx, as_json):
    """The bundle, backbone, store, active head and stored samples."""
    d = _learner(ctx).info()
    if as_json:
        emit_json(d)
        return
    for k in ("bundle", "backbone_file", "backend", "store", "head_version", "feature_dim", "replay_features"):
        click.echo(f"{k + ':':<17}{d[k]}")
    click.echo(f"{'labels:':<17}{', '.join(d['labels'])}")
    click.echo(f"{'samples:':<17}" + (", ".join(f"{k} {v}" for k, v in d["samples"].items()) or "none"))


@device.command()
@click.option("--label", "-l", required=True, help="The class of these photos (a new name makes a new class).")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the features.")
@json_option
@click.pass_context
@handle_errors
def add(ctx, label, images, dtype, as_json):
    """Store labelled photos as features. Unreadable photos are named; the rest are stored."""
    r = _learner(ctx).add([str(i) for i in images], label, dtype=dtype)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"stored {r['stored']} sample(s) of {r['label']!r}"
                   + (f"; {len(r['duplicates'])} already stored" if r["duplicates"] else ""))
        for e in r["errors"]:
            click.echo(f"rejected: {e['error']}", err=True)
    if r["errors"]:
        raise SystemExit(1)


@device.command()
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over replay + stored samples (default 300; with --trainer tflite: 20).")
@click.option("--lr", "learning_rate", type=float, default=None,
              help="Learning rate (default 1e-2; with --trainer tflite: the bundle's).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Samples per step (default 4096, i.e. full batch for most stores; with --trainer tflite: 32).")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None,
              help="adam (default) or sgd; --trainer tflite uses the bundle's SGD step.")
@click.option("--l2", type=float, default=None, help="L2 weight decay (default 0.3; with --trainer tflite: the bundle's).")
@click.option("--no-balance", is_flag=True, help="Do not weight classes inversely to their sample counts.")
@click.option("--seed", type=int, default=0, show_default=True)
@json_option
@click.pass_context
@handle_errors
def train(ctx, epochs, learning_rate, batch_size, optimizer, l2, no_balance, seed, as_json):
    """Retrain the head on the stored samples plus the bundle's replay features."""
    from ..device import HeadTrainConfig

    learner = _learner(ctx)
    given = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size)) if v is not None}
    if ctx.obj["trainer"] == "tflite" and learning_rate is None and optimizer is None and l2 is None:
        from ..device.tflite_trainer import config_for

        cfg = config_for(learner.bundle.pick("trainable_head"), seed=seed, **given)
    else:
        d = HeadTrainConfig()
        cfg = HeadTrainConfig(**given, learning_rate=d.learning_rate if learning_rate is None else learning_rate,
                              optimizer=optimizer or d.optimizer, l2=d.l2 if l2 is None else l2,
                              balance=not no_balance, seed=seed)
    r = learner.train(cfg)
    if as_json:
        emit_json(r)
        return
    click.echo(f"head version {r['version']}: {len(r['labels'])} classes, {r['num_samples']} samples "
               f"({r['stored']} stored + {r['replay']} replay), train accuracy {r['train_accuracy']:.3f}, "
               f"loss {r['final_loss']:.4f}, {r['seconds']:.3f} s")
    if r["new_classes"]:
        click.echo(f"new classes: {', '.join(r['new_classes'])}")


@device.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--mode", type=click.Choice(["head", "ncm"]), default="head", show_default=True,
              help="head: the trained head; ncm: nearest class mean of stored samples (no training needed).")
@json_option
@click.pass_context
@handle_errors
def predict(ctx, images, top_k, mode, as_json):
    """Classify photos with the active head (or nearest class mean)."""
    r = _learner(ctx).predict([str(i) for i in images], top_k=top_k, mode=mode)
    if as_json:
        emit_json(r)
    else:
        for p in r["predictions"]:
            click.echo(f"{p['file']}: error: {p['error']}" if "error" in p else f"{p['file']}: {p['label']} ({p['score']:.3f})")
    if any("error" in p for p in r["predictions"]):
        raise SystemExit(1)


@device.command()
@json_option
@click.pass_context
@handle_errors
def history(ctx, as_json):
    """Head versions, newest last; the active one is marked."""
    h = _learner(ctx).history()
    if as_json:
        emit_json({"versions": h})
        return
    rows = [["*" if v["active"] else "", v["version"], datetime.fromtimestamp(v["created"]).isoformat(timespec="seconds"),
             v["info"].get("origin"), len(v["labels"]),
             f"{v['info']['train_accuracy']:.3f}" if "train_accuracy" in v["info"] else ""] for v in h]
    print_table("head versions", ["active", "version", "created", "origin", "classes", "train acc"], rows)


@device.command()
@click.argument("version", type=int, required=False)
@json_option
@click.pass_context
@handle_errors
def rollback(ctx, version, as_json):
    """Make head VERSION active again (default: the active head's parent)."""
    r = _learner(ctx).rollback(version)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"active head: version {r['version']} ({', '.join(r['labels'])})")


@device.command()
@click.argument("label")
@json_option
@click.pass_context
@handle_errors
def remove(ctx, label, as_json):
    """Delete a label's samples and stop predicting it (rollback restores the head)."""
    r = _learner(ctx).remove(label)
    if as_json:
        emit_json(r)
    else:
        click.echo(f"removed {r['label']!r}: {r['samples_deleted']} sample(s) deleted; active head {r['version']}")


def main() -> None:  # the edgetl-device console script
    device()
