"""The extension report: what was added, how it was trained, and how well new and old classes fare."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from UniversalSegLib.io.atomic import atomic_write


@dataclass
class ExtensionReport:
    """Returned by `extend_model`; `to_dict()` is the JSON form, `summary()` a few readable lines."""

    model_name: str
    model_path: str
    parent: dict[str, Any]  # name, path, weights_sha256 (before and after: must be equal)
    new_classes: list[dict[str, Any]]  # key, name, group, prompt, parents, location, init, similar_to, similarity
    init_selection: dict[str, Any]  # auto mode: per class Dice/loss of similar vs fresh after warm-up
    settings: dict[str, Any]
    data: dict[str, Any]  # description, split, training and held-out cases
    timing_s: dict[str, float]
    parameters: dict[str, int]  # added per class and in total
    heldout: list[dict[str, Any]] = field(default_factory=list)  # score_image() per held-out image
    retention: list[dict[str, Any]] = field(default_factory=list)  # score_image() per retention image
    retention_summary: dict[str, Any] = field(default_factory=dict)  # per retention image name
    naive_baseline: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def write(self, path: str | Path) -> Path:
        """Write the JSON report atomically."""
        with atomic_write(path) as tmp:
            Path(tmp).write_text(self.to_json())
        return Path(path)

    def new_class_dice(self, variant: str = "extended") -> dict[str, float | None]:
        """Held-out Dice of each new class (pooled over held-out images: mean of per-image values)."""
        out: dict[str, list[float]] = {}
        for image in self.heldout:
            for key, row in image["new"].items():
                if row.get(f"{variant}_dice") is not None:
                    out.setdefault(key, []).append(row[f"{variant}_dice"])
        return {k: sum(v) / len(v) for k, v in out.items()}

    def summary(self) -> str:
        """A short human-readable account (the CLI prints it; the Slicer wizard shows it)."""
        f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        lines = [f"Extended {self.parent['name']} -> {self.model_name} ({self.model_path})",
                 "  added: " + ", ".join(f"{c['key']} (init {c['init']})" for c in self.new_classes),
                 f"  training: {self.settings['train']}, {self.timing_s.get('extension', 0):.0f} s "
                 f"({self.settings.get('steps_done')} steps after {self.settings.get('warmup_steps_done')} head "
                 f"warm-up steps); {self.parameters['per_class']:,} parameters per new class"]
        naive = self.new_class_dice("naive") if self.naive_baseline else {}
        for key, d in self.new_class_dice().items():
            extra = f" (naive fine-tuning {f(naive.get(key))})" if self.naive_baseline else ""
            lines.append(f"  held-out Dice {key}: {f(d)}{extra}")
        for name, s in self.retention_summary.items():
            line = f"  retention on {name}: mean {f(s.get('extended_mean_retention'))}"
            if self.naive_baseline:
                line += f" (naive {f(s.get('naive_mean_retention'))})"
            if "well_segmented_classes" in s:
                line += (f"; on the {len(s['well_segmented_classes'])} classes the base model segments with "
                         f"Dice >= 0.8: min {f(s.get('extended_min_retention_well_segmented'))}")
            lines.append(line)
        unchanged = self.parent["weights_sha256_before"] == self.parent["weights_sha256_after"]
        lines.append(f"  base model file unchanged: {unchanged}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
