"""``edgetl train``, ``edgetl eval`` and ``edgetl predict``."""

from __future__ import annotations

from pathlib import Path

import click

from ..formats import BACKENDS, PRECISIONS
from ..train.backbones import BACKBONES
from ..train.config import (
    CLASS_WEIGHTS,
    DISTRIBUTE,
    FEATURE_ENGINES,
    FINAL_FITS,
    FINE_TUNE_KEEP,
    SOLVERS,
    TrainConfig,
)
from .common import (
    ProgressBars,
    default,
    emit_json,
    handle_errors,
    json_option,
    print_table,
    quiet_tensorflow,
    report_predictions,
    threads_option,
)


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


_T = TrainConfig  # defaults are read from the config dataclass: written once


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Run folder to write (default: runs/<data folder name>).")
@click.option("--force", is_flag=True, help="Replace an existing run folder at --out (its feature cache is reused).")
@click.option("--val", "val_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Validation folder with the same class folders (default: hold out --val-split).")
@click.option("--val-split", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=default(_T, "val_split"),
              show_default=True, help="Fraction of each class held out for validation, chosen by hash of the file path.")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default=default(_T, "backbone"), show_default=True,
              help="Pretrained ImageNet feature extractor.")
@click.option("--alpha", type=float, default=None,
              help=f"Width multiplier of MobileNet backbones (default {default(_T, 'alpha')}; "
                   f"mobilenet_v2: {', '.join(map(str, BACKBONES['mobilenet_v2'].alphas))}).")
@click.option("--size", type=int, default=default(_T, "size"), show_default=True, help="Square input size in pixels.")
@click.option("--weights", default=default(_T, "weights"), show_default=True,
              help="'imagenet' (Keras cache, downloads when online), a path to an .h5 file, or 'none'.")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default=default(_T, "solver"), show_default=True,
              help="lbfgs: the linear head solved to convergence, L2 by 5-fold cross-validation (the device's "
                   "solver); adam: Keras epochs with early stopping; auto: lbfgs unless --hidden, --augment or "
                   "--label-smoothing need adam.")
@click.option("--l2", type=click.FloatRange(min=0), default=None,
              help="lbfgs: the L2 penalty (default: chosen by cross-validation on the training photos).")
@click.option("--final-fit", type=click.Choice(list(FINAL_FITS)), default=default(_T, "final_fit"),
              show_default=True,
              help="lbfgs: 'all' refits the head on training + validation photos after measuring it on the "
                   "validation ones (not before fine-tuning); 'train' keeps the head fitted on the training split.")
@click.option("--epochs", type=click.IntRange(min=1), default=default(_T, "epochs"), show_default=True,
              help="adam: head epochs; early stopping on validation loss keeps the best weights.")
@click.option("--batch-size", type=click.IntRange(min=1), default=default(_T, "batch_size"), show_default=True,
              help="Images per step (feature extraction and head training).")
@click.option("--lr", "learning_rate", type=float, default=default(_T, "learning_rate"), show_default=True,
              help="adam: head learning rate.")
@click.option("--hidden", callback=_parse_hidden, default=None,
              help="Hidden Dense layer sizes of the head, e.g. '512' or '512,128' (default: none, a linear head).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=default(_T, "dropout"), show_default=True,
              help="Dropout before each Dense layer of the head.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=default(_T, "label_smoothing"),
              show_default=True, help="Label smoothing of the one-hot targets.")
@click.option("--class-weights", type=click.Choice(list(CLASS_WEIGHTS)), default=default(_T, "class_weights"),
              show_default=True, help="balanced: weight classes inversely to their photo counts.")
@click.option("--patience", type=click.IntRange(min=1), default=default(_T, "patience"), show_default=True,
              help="Early stopping: epochs without a better validation loss before stopping.")
@click.option("--augment", is_flag=True,
              help="Train on augmented images (flip, rotation, zoom, brightness) instead of cached features; "
                   "runs the backbone on every image every epoch.")
@click.option("--fine-tune", is_flag=True,
              help="Fine-tune the top of the backbone after the head with the measured recipe (README "
                   "'Fine-tuning'): trunk activations of a few views per photo, warm-up + cosine, early stopping "
                   "on the validation loss, then the final fit on all photos.")
@click.option("--fine-tune-layers", type=click.IntRange(min=0), default=default(_T, "fine_tune_layers"),
              show_default=True, help="Fine-tune the top N backbone layers instead of the recipe's (BatchNorm stays "
                                      "frozen).")
@click.option("--fine-tune-from", default=None, help="Fine-tune the backbone from this layer name upwards.")
@click.option("--fine-tune-epochs", type=click.IntRange(min=1), default=default(_T, "fine_tune_epochs"),
              show_default=True, help="Most epochs of fine-tuning (early stopping on the validation loss).")
@click.option("--fine-tune-lr", type=float, default=default(_T, "fine_tune_lr"), show_default=True,
              help="Peak learning rate of fine-tuning (Adam, one warm-up epoch, cosine decay).")
@click.option("--fine-tune-views", type=click.IntRange(min=1), default=default(_T, "fine_tune_views"),
              show_default=True, help="Views per photo for fine-tuning: the photo, its mirror image, random crops.")
@click.option("--fine-tune-keep", type=click.Choice(list(FINE_TUNE_KEEP)), default=default(_T, "fine_tune_keep"),
              show_default=True,
              help="better: keep the fine-tuned model only if it classifies more validation photos correctly than the "
                   "head alone (else the run is the head alone, and says so); always: keep it.")
@click.option("--distribute", type=click.Choice(list(DISTRIBUTE)), default=default(_T, "distribute"), show_default=True,
              help="mirrored: all local devices (TensorFlow MirroredStrategy, JAX DataParallel); multiworker: "
                   "several machines, under KERAS_BACKEND=jax (jax.distributed; README 'Extras').")
@click.option("--mixed-precision", is_flag=True, help="bfloat16 compute on GPU.")
@click.option("--strict", is_flag=True, help="An unreadable image is an error instead of a skipped file.")
@click.option("--seed", type=int, default=default(_T, "seed"), show_default=True, help="Random seed.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Feature cache folder (default: RUN_DIR/cache).")
@click.option("--feature-engine", type=click.Choice(list(FEATURE_ENGINES)), default=default(_T, "feature_engine"),
              show_default=True,
              help="What runs the frozen backbone for features: litert (converted once into $KERAS_HOME/edgetl, "
                   "checked against Keras on every run), keras, or auto (litert without a GPU).")
@json_option
@handle_errors
def train(force, as_json, **options):
    """Train a classifier on DATA_DIR (one sub-folder of images per class).

    The frozen backbone turns each image into a feature once (cached in the run folder);
    the head trains on those features in seconds. Writes the run folder: model.keras,
    head.npz, labels.txt, config.json, run.json, history.csv, metrics.json and plots (a
    default run on a backbone already converted to LiteRT imports no TensorFlow, and its
    model.keras is built when first needed).
    A failed run leaves nothing behind; an existing run is replaced only with --force.
    """
    from ..train.run import check_run_target

    cfg = TrainConfig.from_options(**options)
    cfg.check()  # argument errors before TensorFlow is imported
    check_run_target(Path(cfg.out_dir), force)
    quiet_tensorflow()
    from ..train import train as run_train

    with ProgressBars() as bars:
        result = run_train(cfg, progress=bars, force=force)
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
    click.echo(f"head:         {_stopping(result['head_training'])}, {t['head']:.1f} s")
    if result["fine_tune"]:
        click.echo(f"fine-tune:    {_fine_tuned(result['fine_tune'])}, {t['fine_tune']:.1f} s")
    if result["val_accuracy"] is not None:
        click.echo(f"val accuracy: {result['val_accuracy']:.4f} (loss {result['val_loss']:.4f})")
    for s in result["skipped"]:
        click.echo(f"skipped:      {s['reason']}")


def _fine_tuned(f: dict) -> str:
    text = f"from {f['from_layer']}, best epoch {f['best_epoch']} of {f['epochs_run']}"
    if "validation_accuracy" in f:
        text += f"; validation {f['validation_accuracy']:.4f} against {f['head_validation_accuracy']:.4f} for the head"
    if not f["kept"]:
        return text + ": NOT kept, the run is the head alone (--fine-tune-keep always keeps it)"
    return text + (f"; kept: fitted on {f['num_fit']} training + validation photos" if f["fit_on"] == "train+val"
                   else "; kept")


def _stopping(h: dict) -> str:
    if h["solver"] == "lbfgs":
        fit = "training + validation photos" if h["fit_on"] == "train+val" else "training photos"
        return (f"L-BFGS, L2 {h['l2']:g} ({h['l2_chosen_by']}), "
                f"{'converged' if h['converged'] else 'NOT converged'} (largest gradient {h['grad_max']:.1e}); "
                f"kept: fitted on {h['num_fit']} {fit}")
    text = f"{h['epochs_run']} of {h['epochs']} epochs"
    if h["stopped_early"]:
        text += f" (stopped early: no better {h['monitor']} for {h['patience']} epochs; kept epoch {h['best_epoch']})"
    else:
        text += f" (kept epoch {h['best_epoch']}, the best {h['monitor']})"
    return text


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
    fn = click.option("--backend", type=click.Choice(list(BACKENDS)), default=None,
                      help="Runtime for a bundle or model file (default: by file type).")(fn)
    fn = click.option("--precision", type=click.Choice(list(PRECISIONS)), default=None,
                      help="Which of a bundle's files to use (default: the bundle's preferred file).")(fn)
    return threads_option(fn)


MODEL_HELP = "MODEL is a run folder, a bundle (folder or .zip), or a .tflite/.onnx file."


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@_model_options
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per batch.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write confusion_matrix.png, misclassified.csv and mistakes.jpg (a contact sheet of the "
                   "misclassified photos) into this folder.")
@json_option
@handle_errors
def eval_cmd(model, data_dir, labels, backend, precision, threads, batch_size, plots, as_json):
    """Evaluate MODEL on DATA_DIR (one sub-folder per class).

    MODEL is a run folder, a bundle (folder or .zip), or a .tflite/.onnx file.
    Class folders are matched to the model's labels by name.
    """
    quiet_tensorflow()
    from ..predict import evaluate, open_predictor

    predictor = open_predictor(model, labels=labels, threads=threads, backend=backend, precision=precision)
    with ProgressBars() as bars:
        report = evaluate(predictor, data_dir, batch_size=batch_size, progress=bars)
    if plots:
        from ..train.plots import write_eval_plots

        report["plots"] = write_eval_plots(report, plots)
    if as_json:
        emit_json(report)
        return
    _print_report(report)
    if plots:
        click.echo(f"plots: {', '.join(report['plots'].values())}")


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@_model_options
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="How many of the best labels to show per image.")
@json_option
@handle_errors
def predict(model, images, labels, backend, precision, threads, top_k, as_json):
    """Classify IMAGES (files, folders or glob patterns) with MODEL.

    MODEL is a run folder, a bundle (folder or .zip), or a .tflite/.onnx file.
    A folder gives all the images below it; quote a pattern such as 'photos/*.jpg'.
    """
    from ..data import expand_images

    files = expand_images(list(images))
    quiet_tensorflow()
    from ..predict import open_predictor, predict_files

    predictor = open_predictor(model, labels=labels, threads=threads, backend=backend, precision=precision)
    result = predict_files(predictor, files, top_k)
    report_predictions(result, as_json)


@click.command()
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Photo folder, one sub-folder per class (default: TensorFlow's flower_photos, downloaded once).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True,
              help="Folder for everything the demo writes; an earlier demo's folder is replaced.")
@click.option("--holdout", default=None, help="The class the device learns later (default: the last class).")
@click.option("--per-class", type=click.IntRange(min=2), default=60, show_default=True,
              help="Photos per class for the workstation training.")
@click.option("--new-shots", type=click.IntRange(min=1), default=10, show_default=True,
              help="Photos of the held-out class added on the device.")
@click.option("--alpha", type=float, default=default(_T, "alpha"), show_default=True,
              help="Width multiplier of the MobileNetV2 backbone.")
@click.option("--size", type=int, default=default(_T, "size"), show_default=True, help="Square input size in pixels.")
@click.option("--weights", default=default(_T, "weights"), show_default=True,
              help="'imagenet' (Keras cache, downloads when online) or a path to an .h5 file.")
@json_option
@handle_errors
def demo(data, out, holdout, per_class, new_shots, alpha, size, weights, as_json):
    """The whole slice: train, export int8, and teach the device a new class.

    One class of the photo folder is held out; the workstation trains on the others, exports
    an int8 bundle, and the device side (no TensorFlow) learns the held-out class from a few
    photos, then shows accuracy before and after on photos no one trained on.
    """
    TrainConfig(data_dir=str(data), out_dir=str(out), alpha=alpha, size=size, weights=weights).check()
    quiet_tensorflow()
    from ..demo import run_demo

    say = (lambda s: None) if as_json else click.echo
    result = run_demo(out, data=data, holdout=holdout, per_class=per_class, new_shots=new_shots, alpha=alpha,
                      size=size, weights=weights, say=say)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"done in {result['seconds']:.0f} s; everything is under {result['out']}")


@click.group()
def weights():
    """Pretrained weights in the Keras cache, for machines without internet."""


@weights.command("add")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@json_option
@handle_errors
def weights_add(paths, as_json):
    """Copy Keras .h5 weight files (or every .h5 in a folder) into the Keras cache.

    The cache is $KERAS_HOME/models (default ~/.keras/models); --weights imagenet then finds
    them there without downloading. Safe to repeat.
    """
    from ..weights import add_weights

    r = add_weights(list(paths))
    if as_json:
        emit_json({"files": r})
        return
    for f in r:
        click.echo(f"{f['status']}: {f['file']}")


@weights.command("list")
@json_option
@handle_errors
def weights_list(as_json):
    """The .h5 files in the Keras cache."""
    from ..weights import keras_models_dir

    d = keras_models_dir()
    files = sorted(p.name for p in d.glob("*.h5")) if d.is_dir() else []
    if as_json:
        emit_json({"cache": str(d), "files": files})
        return
    click.echo(f"{d}: " + (", ".join(files) if files else "no .h5 files"))
