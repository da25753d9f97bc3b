"""``edgetl train``, ``edgetl eval`` and ``edgetl predict``."""

from __future__ import annotations

from pathlib import Path

import click

from .common import ProgressBars, emit_json, handle_errors, json_option, print_table, quiet_tensorflow, threads_option


def _parse_hidden(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        sizes = tuple(int(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected layer sizes such as '512' or '512,128'; received {value!r}") from None
    if any(s < 1 for s in sizes):
        raise click.BadParameter(f"layer sizes must be positive; received {value!r}")
    return sizes


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder to write (default: runs/<data folder name>).")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None,
              help="Validation folder with the same class folders (default: hold out --val-split).")
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Fraction of each class held out for validation, chosen by hash of the file path.")
@click.option("--backbone", default="mobilenet_v2", show_default=True,
              help="mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0, vgg16, resnet50.")
@click.option("--alpha", type=float, default=None, help="Width multiplier (MobileNet; default 1.0).")
@click.option("--size", type=int, default=224, show_default=True, help="Square input size in pixels.")
@click.option("--weights", default="imagenet", show_default=True,
              help="'imagenet' (Keras cache, downloads when online), a path to an .h5 file, or 'none'.")
@click.option("--epochs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Head epochs; early stopping on validation loss keeps the best weights.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=1e-3, show_default=True, help="Head learning rate (Adam).")
@click.option("--hidden", callback=_parse_hidden, default=None, help="Hidden Dense layer sizes, e.g. '512' or '512,128'.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.5, show_default=True)
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--class-weights", type=click.Choice(["balanced", "none"]), default="balanced", show_default=True)
@click.option("--patience", type=click.IntRange(min=1), default=10, show_default=True, help="Early-stopping patience.")
@click.option("--augment", is_flag=True,
              help="Train on augmented images (flip, rotation, zoom, brightness) instead of cached features; "
                   "runs the backbone on every image every epoch.")
@click.option("--fine-tune-layers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Unfreeze the top N backbone layers after the head (BatchNorm stays frozen).")
@click.option("--fine-tune-from", default=None, help="Unfreeze the backbone from this layer name upwards.")
@click.option("--fine-tune-epochs", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--fine-tune-lr", type=float, default=1e-5, show_default=True)
@click.option("--distribute", type=click.Choice(["none", "mirrored", "multiworker"]), default="none", show_default=True,
              help="mirrored: all local GPUs; multiworker: the cluster in TF_CONFIG.")
@click.option("--mixed-precision", is_flag=True, help="float16 compute on GPU.")
@click.option("--strict", is_flag=True, help="An unreadable image is an error instead of a skipped file.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Feature cache folder (default: RUN_DIR/cache).")
@json_option
@handle_errors
def train(data_dir, out_dir, val_dir, val_split, backbone, alpha, size, weights, epochs, batch_size, learning_rate,
          hidden, dropout, label_smoothing, class_weights, patience, augment, fine_tune_layers, fine_tune_from,
          fine_tune_epochs, fine_tune_lr, distribute, mixed_precision, strict, seed, cache_dir, as_json):
    """Train a classifier on DATA_DIR (one sub-folder of images per class).

    The frozen backbone turns each image into a feature once (cached in the run folder);
    the head trains on those features in seconds. Writes the run folder: model.keras,
    head.npz, labels.txt, config.json, run.json, history.csv, metrics.json and plots.
    """
    quiet_tensorflow()
    from ..train import TrainConfig
    from ..train import train as run_train

    out_dir = out_dir or Path("runs") / Path(data_dir).resolve().name
    cfg = TrainConfig(
        data_dir=str(data_dir), out_dir=str(out_dir), val_dir=str(val_dir) if val_dir else None, val_split=val_split,
        backbone=backbone, alpha=alpha if alpha is not None else (1.0 if backbone.startswith("mobilenet") else None),
        size=size, weights=weights, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        hidden=hidden, dropout=dropout, label_smoothing=label_smoothing, class_weights=class_weights,
        patience=patience, augment=augment, fine_tune_layers=fine_tune_layers, fine_tune_from=fine_tune_from,
        fine_tune_epochs=fine_tune_epochs, fine_tune_lr=fine_tune_lr, distribute=distribute,
        mixed_precision=mixed_precision, strict=strict, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
    )
    with ProgressBars() as bars:
        result = run_train(cfg, progress=bars)
    if as_json:
        emit_json(result)
        return
    t = result["timings_s"]
    click.echo(f"run folder:   {result['run_dir']}")
    click.echo(f"classes:      {', '.join(result['classes'])}")
    click.echo(f"images:       {result['num_train']} train, {result['num_val']} validation, "
               f"{result['num_skipped']} skipped")
    fc = result["feature_cache"]
    click.echo(f"features:     {fc['computed']} computed, {fc['hits']} from cache ({t['features']:.1f} s)")
    click.echo(f"head:         {t['head']:.1f} s" + (f"; fine-tune {t['fine_tune']:.1f} s" if result["fine_tune"] else ""))
    if result["val_accuracy"] is not None:
        click.echo(f"val accuracy: {result['val_accuracy']:.4f} (loss {result['val_loss']:.4f})")
    for s in result["skipped"]:
        click.echo(f"skipped:      {s['reason']}")


def _print_report(report: dict) -> None:
    rows = [[label, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
            for label, m in report["per_class"].items() if m["support"]]
    print_table(f"{report['model']}: accuracy {report['accuracy']:.4f} on {report['num_images']} images",
                ["class", "precision", "recall", "f1", "support"], rows)
    for s in report.get("skipped", []):
        click.echo(f"skipped: {s['reason']}")


def _model_options(fn):
    fn = click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                      help="Labels file (one per line) for a model file without a manifest.")(fn)
    fn = click.option("--backend", type=click.Choice(["litert", "tflite_runtime", "onnxruntime"]), default=None,
                      help="Runtime for a bundle or model file (default: by file type).")(fn)
    fn = click.option("--precision", default=None, help="Which of a bundle's files to use, e.g. int8 or fp32.")(fn)
    return threads_option(fn)


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@_model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@json_option
@handle_errors
def eval_cmd(model, data_dir, labels, backend, precision, threads, batch_size, as_json):
    """Evaluate MODEL (run folder, bundle, or .tflite/.onnx file) on DATA_DIR.

    Class folders are matched to the model's labels by name.
    """
    quiet_tensorflow()
    from ..predictor import evaluate, open_predictor

    predictor = open_predictor(model, labels=labels, threads=threads, backend=backend, precision=precision)
    with ProgressBars() as bars:
        report = evaluate(predictor, data_dir, batch_size=batch_size, progress=bars)
    if as_json:
        emit_json(report)
    else:
        _print_report(report)


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@_model_options
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@json_option
@handle_errors
def predict(model, images, labels, backend, precision, threads, top_k, as_json):
    """Classify IMAGES with MODEL (run folder, bundle, or .tflite/.onnx file)."""
    quiet_tensorflow()
    from ..predictor import open_predictor, predict_files

    predictor = open_predictor(model, labels=labels, threads=threads, backend=backend, precision=precision)
    result = predict_files(predictor, images, top_k)
    if as_json:
        emit_json(result)
    else:
        for p in result["predictions"]:
            if "error" in p:
                click.echo(f"{p['file']}: error: {p['error']}")
            else:
                rest = ", ".join(f"{t['label']} {t['score']:.3f}" for t in p["top"][1:])
                click.echo(f"{p['file']}: {p['label']} ({p['score']:.3f})" + (f"  [{rest}]" if rest else ""))
    if any("error" in p for p in result["predictions"]):
        raise SystemExit(1)


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Photo folder, one sub-folder per class (default: TensorFlow's flower_photos, downloaded once).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--holdout", default=None, help="The class the device learns later (default: the last class).")
@click.option("--per-class", type=click.IntRange(min=2), default=60, show_default=True,
              help="Photos per class for the workstation training.")
@click.option("--new-shots", type=click.IntRange(min=1), default=10, show_default=True,
              help="Photos of the held-out class added on the device.")
@click.option("--alpha", type=float, default=1.0, show_default=True)
@click.option("--size", type=int, default=224, show_default=True)
@click.option("--weights", default="imagenet", show_default=True)
@json_option
@handle_errors
def demo(data, out, holdout, per_class, new_shots, alpha, size, weights, as_json):
    """The whole slice: train, export int8, and teach the device a new class.

    One class of the photo folder is held out; the workstation trains on the others, exports
    an int8 bundle, and the device side (no TensorFlow) learns the held-out class from a few
    photos, printing what happened at each step.
    """
    quiet_tensorflow()
    from ..demo import run_demo

    say = (lambda s: None) if as_json else click.echo
    result = run_demo(out, data=data, holdout=holdout, per_class=per_class, new_shots=new_shots, alpha=alpha,
                      size=size, weights=weights, say=say)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"done in {result['seconds']:.0f} s; everything is under {result['out']}")
