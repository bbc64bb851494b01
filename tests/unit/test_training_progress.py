"""Progress of a training run as the trainer reports it (issue: runs showed ``running`` with
no epoch, step or metric)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import torch

from training.progress import ProgressCallback
from training.progress import RunHooks


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_trainer(**fields: Any) -> SimpleNamespace:
    values = {
        "num_training_batches": 4,
        "max_epochs": 10,
        "global_step": 0,
        "current_epoch": 0,
        "callback_metrics": {},
        "sanity_checking": False,
    }
    return SimpleNamespace(**{**values, **fields})


def test_reports_epoch_steps_metrics_and_an_eta_throttled() -> None:
    reports: list[dict[str, Any]] = []
    clock = Clock()
    callback = ProgressCallback(reports.append, interval=5.0, clock=clock)
    trainer = fake_trainer()
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]
    assert reports[-1]["step"] == 0 and reports[-1]["eta_seconds"] is None

    clock.now += 2.0
    trainer.global_step = 1
    callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert len(reports) == 1, "reports are throttled while batches run"

    clock.now += 8.0  # 10 s for 2 of 40 steps: 190 s to go
    trainer.global_step = 2
    trainer.callback_metrics = {"val_loss": torch.tensor(0.75), "val_acc": torch.tensor(0.5)}
    callback.on_train_batch_end(trainer)  # type: ignore[arg-type]
    report = reports[-1]
    assert (report["stage"], report["epoch"], report["max_epochs"]) == ("training", 1, 10)
    assert (report["step"], report["total_steps"]) == (2, 40)
    assert report["eta_seconds"] == 190.0
    assert report["metrics"] == {"val_loss": 0.75, "val_acc": 0.5}

    trainer.current_epoch = 1
    callback.on_validation_end(trainer, None)  # type: ignore[arg-type]
    assert len(reports) == 3 and reports[-1]["epoch"] == 2, "epoch ends always report"
    trainer.sanity_checking = True
    callback.on_validation_end(trainer, None)  # type: ignore[arg-type]
    assert len(reports) == 3, "the sanity check is not an epoch"


def test_hooks_report_stages_and_stay_silent_without_a_reporter() -> None:
    reports: list[dict[str, Any]] = []
    RunHooks(report=reports.append).stage("evaluating", epochs_trained=3)
    assert reports == [{"stage": "evaluating", "epochs_trained": 3}]
    RunHooks().stage("evaluating")  # nothing to report to: no error


def test_a_gpu_run_without_a_gpu_is_one_clear_line(tmp_path) -> None:
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        return
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "training.accelerator=gpu", "model=cnn",
         f"data.path={tmp_path}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "EMOTIONS_VAR_DIR": str(tmp_path / "var")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "error: training.accelerator=gpu, but no CUDA GPU is visible" in result.stderr


def test_the_command_line_says_what_to_do_with_a_version_it_did_not_promote() -> None:
    from face_emotions.registry.promotion import PromotionDecision
    from training.train import outcome_line

    kept = SimpleNamespace(
        version=SimpleNamespace(version=4),
        promotion=PromotionDecision(False, "does not beat the champion: ...", 3, 4),
    )
    line = outcome_line(kept)  # type: ignore[arg-type]
    assert line.startswith("v4 not promoted, v3 stays champion")
    assert line.endswith("To serve it anyway: face-emotions promote 4")
    moved = SimpleNamespace(
        version=SimpleNamespace(version=4), promotion=PromotionDecision(True, "promote=force", 3, 4)
    )
    assert outcome_line(moved) == "v4 is now champion (replaces v3): promote=force"  # type: ignore[arg-type]
