"""What every evaluator shares: a name prefix on its metric keys, a primary metric, and an
optional CSV log (a header once, then one row per call)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Evaluator:
    greater_is_better = True
    primary_metric: str | None = None

    def __init__(self, name: str = "", write_csv: bool = True) -> None:
        self.name = name
        self.write_csv = write_csv

    def __call__(
        self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        metrics = self.compute(model)
        if output_path is not None and self.write_csv:
            header, row = self.csv_row(metrics)
            self._append_csv(Path(output_path), header, [epoch, steps, *row])
        return self.prefixed(metrics)

    def compute(self, model: Any) -> dict[str, float]:
        raise NotImplementedError

    def csv_file(self) -> str:
        return f"{type(self).__name__}{'_' + self.name if self.name else ''}_results.csv"

    def csv_row(self, metrics: dict[str, float]) -> tuple[list[str], list[Any]]:
        return list(metrics), list(metrics.values())

    def prefixed(self, metrics: dict[str, float]) -> dict[str, float]:
        if not self.name:
            return {k: float(v) for k, v in metrics.items()}
        if self.primary_metric and not self.primary_metric.startswith(self.name + "_"):
            self.primary_metric = f"{self.name}_{self.primary_metric}"
        return {f"{self.name}_{k}": float(v) for k, v in metrics.items()}

    def _append_csv(self, folder: Path, header: Sequence[str], row: Sequence[Any]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.csv_file()
        new = not path.exists()
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "steps", *header])
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())


class SequentialEvaluator(Evaluator):
    """Several evaluators in one call; the score is the last one's primary metric by default."""

    def __init__(self, evaluators: Sequence[Evaluator], main_score_function=lambda scores: scores[-1]) -> None:
        super().__init__("", write_csv=False)
        self.evaluators = list(evaluators)
        self.main_score_function = main_score_function
        self.primary_metric = "sequential_score"

    def __call__(
        self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1
    ) -> dict[str, float]:
        merged: dict[str, float] = {}
        scores = []
        for i, ev in enumerate(self.evaluators):
            result = ev(model, output_path, epoch, steps)
            if not isinstance(result, dict):  # a user's evaluator that returns a bare score, as ST allows
                scores.append(result)
                result = {f"evaluator_{i}": result}
            else:
                primary = getattr(ev, "primary_metric", None)
                key = primary if primary in result else next(iter(result))
                scores.append(result[key])
            merged.update(result)
        # sentence-transformers scores an empty sequence 0.0 rather than calling the function on [].
        merged["sequential_score"] = float(self.main_score_function(scores)) if scores else 0.0
        return merged
