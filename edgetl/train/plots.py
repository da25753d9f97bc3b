"""PNG plots of a run: training curves and the confusion matrix (matplotlib, Agg)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..fileio import atomic_write_bytes
from ..preprocess import load_pixels


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_history(rows: list[dict], path: str | Path, head_training: dict | None = None) -> None:
    """What training did: the epochs of gradient training (loss and accuracy per epoch, with
    the fine-tuning stage marked) and, for the default solver (one exact fit, no epochs), its
    choice of L2: the cross-validated accuracy of every L2 tried, with its standard error."""
    plt = _figure()
    solver = (head_training or {}).get("solver") == "lbfgs"
    cv = (head_training or {}).get("cv") if solver else None
    epoch_rows = [r for r in rows if not (solver and r["stage"] == "head")]
    panels = (["loss", "accuracy"] if epoch_rows else []) + (["cv"] if cv else [])
    if not panels:  # an L2 given by the user and no epochs: one solve, nothing to draw over time
        panels = ["solve"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "cv":
            _plot_cv(ax, cv, head_training)
        elif panel == "solve":
            _plot_solve(ax, head_training or {}, rows)
        else:
            _plot_epochs(ax, epoch_rows, panel)
    _save(fig, Path(path))
    plt.close(fig)


def _plot_epochs(ax, rows: list[dict], metric: str) -> None:
    epochs = [r["epoch"] for r in rows]
    for key, style in ((metric, "-o"), (f"val_{metric}", "-s")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            ax.plot(epochs, [y if y is not None else float("nan") for y in ys], style, ms=3, label=key)
    ft = [r["epoch"] for r in rows if r["stage"] == "fine_tune"]
    if ft:
        ax.axvline(ft[0] - 0.5, color="grey", ls="--", lw=1)
        ax.text(ft[0] - 0.4, ax.get_ylim()[1], "fine-tune", va="top", fontsize=8, color="grey")
    ax.set_xlabel("epoch")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_cv(ax, cv: list[dict], head_training: dict) -> None:
    l2 = [c["l2"] for c in cv]
    ax.errorbar(l2, [c["cv_accuracy"] for c in cv], yerr=[c["stderr"] for c in cv], fmt="-o", ms=3, capsize=3,
                label="cross-validated accuracy (± 1 s.e.)")
    chosen = head_training.get("l2")
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"chosen L2 = {chosen:g}")
    ax.set_xscale("log")
    ax.set_xlabel("L2")
    ax.set_title("head: L2 chosen by cross-validation", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _plot_solve(ax, head_training: dict, rows: list[dict]) -> None:
    last = rows[-1] if rows else {}
    lines = [f"head solved exactly (L-BFGS) at L2 = {head_training.get('l2', '?')}",
             f"{head_training.get('iterations', '?')} iterations, converged: {head_training.get('converged', '?')}"]
    lines += [f"{k} = {last[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy") if last.get(k) is not None]
    ax.text(0.02, 0.95, "\n".join(lines), va="top", fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def plot_confusion(cm: list[list[int]], labels: list[str], path: str | Path, title: str = "validation") -> None:
    import numpy as np

    plt = _figure()
    m = np.asarray(cm)
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"confusion matrix ({title}, accuracy {acc:.3f})", fontsize=9)
    hi = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] > hi / 2 else "black")
    _save(fig, Path(path))
    plt.close(fig)


def contact_sheet(items: list[dict], path: str | Path, thumb: int = 128, columns: int = 6) -> None:
    """A JPEG grid of photos with two caption lines each (Pillow only): ``items`` hold
    ``file`` and ``caption`` (``true -> predicted (score)``)."""
    from PIL import Image, ImageDraw


    cols = max(1, min(columns, len(items)))
    rows = max(1, -(-len(items) // cols))
    cap = 28
    sheet = Image.new("RGB", (cols * thumb, rows * (thumb + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, item in enumerate(items):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + cap)
        try:
            px, _ = load_pixels(item["file"], thumb)
            sheet.paste(Image.fromarray(px), (x, y))
        except Exception:  # an unreadable photo still gets its caption
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline="grey")
        for j, line in enumerate(item["caption"].splitlines()[:2]):
            draw.text((x + 3, y + thumb + 1 + 13 * j), line[:24], fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    atomic_write_bytes(Path(path), buf.getvalue())


def write_eval_plots(report: dict, folder: str | Path, max_mistakes: int = 60) -> dict:
    """``eval --plots``: confusion matrix PNG, misclassified.csv, and a contact sheet of the mistakes."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {"confusion_matrix": str(folder / "confusion_matrix.png"),
               "misclassified": str(folder / "misclassified.csv")}
    plot_confusion(report["confusion_matrix"], report["labels"], folder / "confusion_matrix.png",
                   title=Path(report.get("data_dir", "data")).name)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "true", "predicted", "score"])
    for m in report["misclassified"]:
        w.writerow([m["file"], m["true"], m["predicted"], f"{m['score']:.4f}"])
    atomic_write_bytes(folder / "misclassified.csv", buf.getvalue().encode("utf-8"))
    if report["misclassified"]:
        items = [{"file": m["file"], "caption": f"{m['true']} ->\n{m['predicted']} ({m['score']:.2f})"}
                 for m in report["misclassified"][:max_mistakes]]
        contact_sheet(items, folder / "mistakes.jpg")
        written["mistakes"] = str(folder / "mistakes.jpg")
    return written
