"""``edgetl export`` and ``edgetl bench``."""

from __future__ import annotations

from pathlib import Path

import click

from ..export.config import ExportConfig
from ..formats import FORMATS, IO_TYPES, MODEL_ROLES
from ..train.run import Run
from .common import (
    ProgressBars,
    check_targets,
    default,
    emit_json,
    handle_errors,
    json_option,
    print_table,
    quiet_tensorflow,
    threads_option,
)

_E = ExportConfig  # defaults are read from the config dataclass: written once
_FORMAT_HELP = "; ".join(f"{f.name}: {', '.join(f.precisions)}" for f in FORMATS.values())


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write (default: models/<run folder name>).")
@click.option("-f", "--format", "targets", multiple=True, default=default(_E, "targets"), show_default=True,
              callback=check_targets,
              help=f"FORMAT[:PRECISION[+PRECISION]] or FORMAT:all; repeatable. {_FORMAT_HELP}.")
@click.option("--role", "roles", multiple=True, type=click.Choice(list(MODEL_ROLES)),
              default=default(_E, "roles"), show_default=True,
              help="classifier: image -> probabilities; backbone: image -> feature (for on-device learning).")
@click.option("--io", type=click.Choice(IO_TYPES), default=default(_E, "io"), show_default=True,
              help="Input/output type of --full-int8 TFLite files (mixed int8 files take float).")
@click.option("--calibration-images", type=click.IntRange(min=1), default=default(_E, "calibration_images"),
              show_default=True, help="Training photos used to calibrate int8 (balanced over classes).")
@click.option("--max-drop", type=float, default=default(_E, "max_drop"), show_default=True,
              help="Fail when an int8 file's accuracy is more than this many points below Keras.")
@click.option("--replay-per-class", type=click.IntRange(min=0), default=default(_E, "replay_per_class"),
              show_default=True,
              help="Training photos per class whose features (float16, 2.5 KB each at 1280-d) ship "
                   "for on-device retraining; more keeps the original classes better.")
@click.option("--max-classes", type=click.IntRange(min=1), default=None,
              help="tflite-trainable: output slots, so a phone can add classes (default: classes + 8).")
@click.option("--trainable-lr", type=float, default=default(_E, "trainable_lr"), show_default=True,
              help="tflite-trainable: SGD learning rate of its train() signature.")
@click.option("--trainable-l2", type=float, default=default(_E, "trainable_l2"), show_default=True,
              help="tflite-trainable: L2 weight decay of its train() signature.")
@click.option("--no-refit-head", is_flag=True,
              help="Keep the float head for int8 files instead of re-fitting it (distilling the float model) "
                   "on the quantized backbone's features.")
@click.option("--full-int8", is_flag=True,
              help="Make int8 TFLite files full-integer (every op int8, I/O per --io; for accelerators that need "
                   "one). By default a classifier's head and the layers int8 hurts most stay float, which "
                   "agrees better with Keras on every CPU.")
@click.option("--float-error", type=click.FloatRange(min=0), default=default(_E, "float_error"), show_default=True,
              help="Mixed int8: keep in float each layer whose int8 output error, measured on calibration photos, "
                   "exceeds this many quantization steps (RMSE / scale).")
@click.option("--no-verify", is_flag=True, help="Skip running every file against Keras on the validation photos.")
@click.option("--val", "val_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Verify and gate every file on these photos (one folder per class) instead of the run's "
                   "validation split, which the default head was also refitted on.")
@click.option("--zip", "make_zip", is_flag=True, help="Also write the bundle as one .zip beside the folder.")
@click.option("--force", is_flag=True, help="Replace an existing bundle.")
@threads_option
@json_option
@handle_errors
def export(run_dir, out, targets, roles, io, calibration_images, max_drop, replay_per_class, max_classes, trainable_lr,
           trainable_l2, no_refit_head, full_int8, float_error, no_verify, val_dir, make_zip, force, threads, as_json):
    """Export RUN_DIR to a bundle: TFLite/ONNX files, head, labels, manifest.

    Every file is checked for the tensor types asked for and, unless --no-verify, run in its
    runtime (LiteRT, ONNX Runtime) on the run's validation photos and compared with Keras.
    """
    # Built (and its arguments checked) before TensorFlow is imported.
    config = ExportConfig(targets=targets, roles=roles, io=io, calibration_images=calibration_images,
                          verify=not no_verify, max_drop=max_drop, replay_per_class=replay_per_class,
                          make_zip=make_zip, force=force, threads=threads, refit_head=not no_refit_head,
                          max_classes=max_classes, trainable_lr=trainable_lr, trainable_l2=trainable_l2,
                          full_integer=full_int8, float_error=float_error,
                          val_dir=str(val_dir) if val_dir else None)
    Run(run_dir)  # not a run folder: said before TensorFlow is imported
    quiet_tensorflow()
    from ..export import export_run

    with ProgressBars() as bars:
        report = export_run(run_dir, out, config, progress=bars)
    if as_json:
        emit_json(report)
        return
    click.echo(f"bundle: {report['bundle']}" + (f"  (zip: {report['zip']})" if report.get("zip") else ""))
    sizes = {f["file"]: f["bytes"] for f in report["manifest"]["files"]}
    rows = []
    for v in report["files"]:
        rows.append([v["file"], f"{sizes[v['file']] / 1e6:.2f}", f"{v['accuracy']:.4f}",
                     f"{v['top1_agreement']:.4f}",
                     f"{v['cosine_mean']:.5f}" if "cosine_mean" in v else f"{v['max_abs_diff']:.2e}"])
    if rows:
        print_table(f"verified on {report['verified_on_photos']}; Keras accuracy {report['keras_accuracy']:.4f}",
                    ["file", "MB", "accuracy", "agreement", "cosine / max diff"], rows)


def _fmt(v, spec="{:.3f}"):
    return "" if v is None else spec.format(v)


@click.command()
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-f", "--format", "targets", multiple=True, default=None, callback=check_targets,
              help="Targets as for export (default: every format and precision). Run folders only.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed batch-1 runs per file.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs per file before the timed ones.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training photos used to calibrate int8 (run folders).")
@click.option("--max-drop", type=float, default=1.0, show_default=True,
              help="Mark an int8 file as failed when its accuracy is more than this many points below Keras.")
@click.option("--io", type=click.Choice(IO_TYPES), default="int8", show_default=True,
              help="Input/output type of --full-int8 TFLite files (mixed int8 files take float).")
@click.option("--full-int8", is_flag=True, help="Benchmark full-integer int8 TFLite files instead of mixed ones.")
@threads_option
@json_option
@handle_errors
def bench(model, data_dir, targets, runs, warmup, calibration_images, max_drop, io, full_int8, threads, as_json):
    """Benchmark every format x precision of MODEL (run folder or bundle) on DATA_DIR.

    Rows: status, file size, accuracy and its difference to Keras, batch-1 latency p50/p95 with
    one thread and with all threads, and peak memory of a process running the file.
    """
    if targets and not (Path(model) / "run.json").is_file():
        raise click.UsageError(f"-f/--format chooses what to export from a run folder; {str(model)!r} is not one, "
                               "and a bundle or a file is benchmarked with the files it holds: leave -f out")
    quiet_tensorflow()
    from ..bench import bench as run_bench

    with ProgressBars() as bars:
        result = run_bench(model, data_dir, targets=list(targets) or None, runs=runs, warmup=warmup, threads=threads,
                           calibration_images=calibration_images, max_drop=max_drop, io=io, full_integer=full_int8,
                           progress=bars)
    if as_json:
        emit_json(result)
        return
    rows = [[r["format"], r["precision"], r["status"], _fmt(r.get("size_mb"), "{:.2f}"), _fmt(r.get("accuracy"), "{:.4f}"),
             _fmt(r.get("diff_points"), "{:+.2f}"), _fmt(r.get("agreement"), "{:.4f}"), _fmt(r.get("p50_ms_1t"), "{:.2f}"), _fmt(r.get("p95_ms_1t"), "{:.2f}"),
             _fmt(r.get("p50_ms_all"), "{:.2f}"), _fmt(r.get("p95_ms_all"), "{:.2f}"), _fmt(r.get("peak_rss_mb"), "{:.0f}")]
            for r in result["rows"]]
    print_table(f"{result['source']} on {result['data_dir']} (batch 1; all = {result['threads_all']} threads)",
                ["format", "precision", "status", "MB", "accuracy", "diff pts", "agree", "p50 1t ms", "p95 1t ms",
                 "p50 all ms", "p95 all ms", "peak MB"], rows)
    for r in result["rows"]:
        if r.get("error"):
            click.echo(f"{r['format']} {r['precision']}: {r['status']}: {r['error']}")
