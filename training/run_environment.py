"""What a training run needs from the machine it runs on, decided before anything is fitted:
precision and accelerator, one log handler, the progress bar's pace, and face cropping.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Literal

from omegaconf import DictConfig

from training.progress import RunHooks

if TYPE_CHECKING:
    # What ``lightning.Trainer(precision=...)`` accepts (Lightning has no public name for it).
    from lightning.fabric.connector import _PRECISION_INPUT

    from face_emotions.faces.crop import CropSpec
    from training.face_crops import FaceCropping

#: Seconds between two "detecting faces" progress reports.
CROP_REPORT_SECONDS = 5.0


def resolve_precision(
    accelerator: str, precision: _PRECISION_INPUT | Literal["auto"]
) -> _PRECISION_INPUT:
    """Mixed precision only where it pays off: bf16 on GPUs that have it, fp16 on the others."""
    if precision != "auto":
        return precision
    import torch

    if not uses_gpu(accelerator):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def uses_gpu(accelerator: str) -> bool:
    import torch

    return accelerator in {"gpu", "cuda"} or (accelerator == "auto" and torch.cuda.is_available())


def one_handler_for_lightning() -> None:
    """``import lightning`` gives its logger a console handler of its own that also propagates
    to the root logger: with the service's (or Celery's, or Hydra's) root handler, every
    Lightning line came out twice. Where the root logger prints, Lightning's own handler goes."""
    lightning_logger = logging.getLogger("lightning")
    if not logging.getLogger().handlers:
        return
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


def check_accelerator(accelerator: str) -> None:
    """Refuse a GPU run without a GPU in one sentence (Lightning's error is a traceback)."""
    import torch

    if accelerator in {"gpu", "cuda"} and not torch.cuda.is_available():
        raise ValueError(
            f"training.accelerator={accelerator}, but no CUDA GPU is visible to this process: "
            "use training.accelerator=cpu (or auto, which takes a GPU when there is one)"
        )


def refresh_rate() -> int:
    """Redraw often on a terminal, rarely in CI logs where each redraw is a new line."""
    return 1 if sys.stderr.isatty() else 20


def face_cropping(cfg: DictConfig, crop: CropSpec, hooks: RunHooks) -> FaceCropping | None:
    """``data.faces=detect``: crop with the serving detector's settings (the crop cache and the
    served crops then agree), on the training GPU when there is one; progress every 5 s."""
    if crop.faces != "detect":
        return None
    from face_emotions.faces.detection import FaceDetector
    from face_emotions.settings import Settings
    from training.face_crops import FaceCropping

    settings = Settings()
    device = "cuda" if uses_gpu(str(cfg.training.accelerator)) else "cpu"
    last = [float("-inf")]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= CROP_REPORT_SECONDS:
            last[0] = now
            hooks.stage("detecting faces", images_done=done, images_total=total)

    return FaceCropping(
        spec=crop,
        cache_dir=Path(cfg.data.crop_cache),
        no_face=str(cfg.data.no_face),
        detector_factory=lambda: FaceDetector.from_settings(settings, device),
        on_progress=report,
    )
