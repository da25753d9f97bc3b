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


def plot_history(rows: list[dict], path: str | Path) -> None:
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [r["epoch"] for r in rows]
    for ax, metric in zip(axes, ("loss", "accuracy")):
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
    _save(fig, Path(path))
    plt.close(fig)


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
