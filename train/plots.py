"""Training curves as a PNG: loss, train/val F-score and learning rate per epoch."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_f, ax_lr) = plt.subplots(1, 3, figsize=(14, 3.8))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker=".")
    ax_loss.set(title="training loss (CE + Dice)", xlabel="epoch")
    ax_f.plot(epochs, [r["train_f_score"] for r in rows], marker=".", label="train (no augmentation)")
    ax_f.plot(epochs, [r["val_f_score"] for r in rows], marker=".", label="val")
    best = max(rows, key=lambda r: r["val_f_score"])
    ax_f.axhline(best["val_f_score"], color="grey", lw=0.8, ls="--")
    ax_f.set(title=f"F-score (best val {best['val_f_score']:.4f} @ {best['epoch']})", xlabel="epoch")
    ax_f.legend(loc="lower right")
    ax_lr.plot(epochs, [r["lr"] for r in rows], marker=".")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (ax_loss, ax_f, ax_lr):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = Path(out_path).with_name(f".{Path(out_path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_path)
