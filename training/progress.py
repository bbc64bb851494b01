"""How a caller follows a run: progress reports, the MLflow run id, and the promotion.

``python -m training.train`` prints progress itself; the trainer service stores it with the run
(``GET /api/v1/training-runs/<id>``: stage, epoch, steps, latest validation metrics, ETA), so a
run of hours is not a silent ``running``. Reports are throttled: a database write per batch
would cost more than some batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L

Report = Callable[[dict[str, Any]], None]
#: Seconds between two reports while batches run (stage changes and epoch ends always report).
REPORT_INTERVAL_SECONDS = 5.0
#: The validation metrics worth showing next to the epoch.
SHOWN_METRICS = ("val_loss", "val_acc", "val_f1", "train_loss")


@dataclass
class RunHooks:
    """Callbacks of a run; each is optional and must not raise."""

    #: A promotion moved the serving alias: tell the workers (a reload broadcast).
    announce: Callable[[], None] | None = None
    #: A progress report: ``{"stage": ..., "epoch": ..., ...}``.
    report: Report | None = None
    #: The run's MLflow run exists: link it before anything can fail.
    mlflow_run_started: Callable[[str], None] | None = None

    def stage(self, stage: str, **fields: Any) -> None:
        if self.report is not None:
            self.report({"stage": stage, **fields})


class ProgressCallback(L.Callback):
    """Reports epoch, global step, the latest metrics and an ETA while ``fit`` runs.

    The ETA is an upper bound: it assumes every epoch runs, and early stopping may end sooner.
    """

    def __init__(
        self,
        report: Report,
        *,
        interval: float = REPORT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._report = report
        self._interval = interval
        self._clock = clock
        self._started = 0.0
        self._last = float("-inf")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._clock()
        self._send(trainer, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, *_args: Any, **_kwargs: Any) -> None:
        self._send(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._send(trainer, force=True)

    def _send(self, trainer: L.Trainer, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        per_epoch = _batches_per_epoch(trainer)
        total = per_epoch * trainer.max_epochs if per_epoch and trainer.max_epochs else None
        step = int(trainer.global_step)
        eta = None
        if total and step:
            eta = round((now - self._started) / step * max(total - step, 0), 1)
        metrics = {
            key: round(float(value), 6)
            for key in SHOWN_METRICS
            if (value := trainer.callback_metrics.get(key)) is not None
        }
        self._report(
            {
                "stage": "training",
                "epoch": int(trainer.current_epoch) + 1,
                "max_epochs": trainer.max_epochs,
                "step": step,
                "total_steps": total,
                "metrics": metrics,
                "eta_seconds": eta,
            }
        )


def _batches_per_epoch(trainer: L.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if isinstance(batches, int | float) and batches != float("inf") and batches > 0:
        return int(batches)
    return None
