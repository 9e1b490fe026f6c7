"""The run's records: a CSV of training steps, a CSV of validation scores and a PNG of both curves.

Files in the run folder:
    train_log.csv       step, epoch, loss, lr, time (seconds since the run started), loss/<dataset>...
    validation.csv      step, dataset, case, class, dice, nsd (one row per class per case)
    training_curves.png loss (raw and smoothed) and mean validation Dice per dataset against step
On resume, rows after the resumed step (written after the last checkpoint by the killed run)
are dropped, so the records read as one uninterrupted run.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from UniversalSegLib.io.atomic import atomic_write
from UniversalSegLib.train.validation import ClassScore

TRAIN_CSV = "train_log.csv"
VAL_CSV = "validation.csv"
PLOT_PNG = "training_curves.png"
VAL_FIELDS = ["step", "dataset", "case", "class", "dice", "nsd"]


class RunLog:
    """Appends training and validation rows and redraws the curves; only the main rank makes one."""

    def __init__(self, folder: str | Path, datasets: Sequence[str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.train_fields = ["step", "epoch", "loss", "lr", "time"] + [f"loss/{d}" for d in datasets]
        self.train_path, self.val_path = self.folder / TRAIN_CSV, self.folder / VAL_CSV

    def start(self, resume_step: int | None) -> None:
        """Create fresh files, or keep the rows up to `resume_step` of an interrupted run."""
        for path, fields in ((self.train_path, self.train_fields), (self.val_path, VAL_FIELDS)):
            rows = _read(path) if resume_step is not None else []
            kept = [r for r in rows if int(float(r["step"])) <= (resume_step or 0)]
            _write_atomic(path, fields, kept)

    def log_step(self, step: int, epoch: int, loss: float, lr: float, elapsed: float,
                 dataset_losses: dict[str, float]) -> None:
        row = {"step": step, "epoch": epoch, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}", "time": f"{elapsed:.2f}"}
        row.update({f"loss/{d}": f"{v:.6g}" for d, v in dataset_losses.items() if f"loss/{d}" in self.train_fields})
        _append(self.train_path, self.train_fields, [row])

    def log_validation(self, step: int, scores: Iterable[ClassScore]) -> None:
        rows = [{"step": step, "dataset": s.dataset, "case": s.case, "class": s.class_key,
                 "dice": _fmt(s.dice), "nsd": _fmt(s.nsd)} for s in scores]
        _append(self.val_path, VAL_FIELDS, rows)

    def plot(self) -> Path:
        """Redraw training_curves.png from the CSV files (atomically)."""
        return plot_curves(self.train_path, self.val_path, self.folder / PLOT_PNG)


def _fmt(v: float) -> str:
    return "" if math.isnan(v) else f"{v:.6g}"


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_atomic(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _append(path: Path, fields: Sequence[str], rows: list[dict]) -> None:
    if not path.is_file():
        _write_atomic(path, fields, [])
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore").writerows(rows)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(train_csv: Path, val_csv: Path, png: Path) -> Path:
    """Loss against step (left) and mean validation Dice per dataset against step (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_dice = fig.subplots(1, 2)
    train = _read(train_csv)
    steps = [int(r["step"]) for r in train]
    losses = [float(r["loss"]) for r in train]
    if steps:
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
        ax_loss.plot(steps, _moving_average(losses, max(1, len(losses) // 50)), color="tab:blue", label="smoothed")
    ax_loss.set(xlabel="step", ylabel="loss (BCE + Dice, summed over classes)", title="Training loss")
    ax_loss.legend(loc="upper right")

    per_dataset: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _read(val_csv):
        if r["dice"]:
            per_dataset[r["dataset"]][int(r["step"])].append(float(r["dice"]))
            per_dataset["all"][int(r["step"])].append(float(r["dice"]))
    for name, by_step in sorted(per_dataset.items()):
        xs = sorted(by_step)
        style = {"color": "black", "lw": 2} if name == "all" else {}
        ax_dice.plot(xs, [sum(by_step[x]) / len(by_step[x]) for x in xs], marker="o", label=name, **style)
    ax_dice.set(xlabel="step", ylabel="mean Dice", title="Validation Dice", ylim=(0, 1))
    if per_dataset:
        ax_dice.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_write(png) as tmp:  # the temporary name keeps ".png": savefig picks the format from it
        fig.savefig(tmp)
    return png
