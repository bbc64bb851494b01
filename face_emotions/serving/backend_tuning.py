"""Backend autotuning at load (``EMOTIONS_BACKEND=auto``): serve the fastest backend that agrees.

Which backend is fastest depends on the CPU (VNNI makes INT8 pay, AVX512-BF16 or AMX makes
bf16 pay), the GPU, the model and its input size, so a worker measures instead of guessing:
each backend the version can run here gets a warm-up pass, then all of them are timed in a
few interleaved rounds (one pass each per round) on a micro-batch of the version's input size,
and the fastest *eligible* one (median pass) serves. A backend is
eligible when its top-1 classes agree with the fp32 reference on the version's probe images
(test images stored with the version) at least ``min_agreement`` of the time; a version without
probe images can't be checked, so only its exact fp32 backends and its gated INT8 variant (judged
on the whole test split at registration) compete. The choice is remade at every load (each new
champion, each pinned version), per worker process.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from face_emotions.modeling.bundle import Bundle
from face_emotions.serving.predictor import Backend
from face_emotions.serving.predictor import Predictor

log = logging.getLogger(__name__)

#: Top-1 agreement with fp32 a backend needs on the probe images (the INT8 gate's figure).
MIN_AGREEMENT = 0.98
#: Backends that compute exactly what the model was validated with (up to float rounding).
EXACT: tuple[Backend, ...] = ("onnx", "torch")


@dataclass
class Trial:
    backend: Backend
    images_per_second: float | None = None
    #: Top-1 agreement with the fp32 reference on the probe images (None: not checked).
    agreement: float | None = None
    eligible: bool = False
    #: Why a backend was not eligible (failed to build, disagreed, could not be checked).
    reason: str = ""


@dataclass
class Tuning:
    chosen: Backend
    predictor: Predictor
    trials: list[Trial] = field(default_factory=list)

    def table(self) -> str:
        """The measurements as a log-friendly table, fastest first."""
        lines = [f"{'backend':<11} {'img/s':>8} {'agree':>7}  note"]
        ranked = sorted(self.trials, key=lambda t: -(t.images_per_second or 0.0))
        for trial in ranked:
            speed = "-" if trial.images_per_second is None else f"{trial.images_per_second:.1f}"
            agree = "-" if trial.agreement is None else f"{100 * trial.agreement:.1f}%"
            note = "chosen" if trial.backend == self.chosen else trial.reason
            lines.append(f"{trial.backend:<11} {speed:>8} {agree:>7}  {note}")
        return "\n".join(lines)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``), empty where they can't be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_supported(device: torch.device) -> bool:
    """bf16 runs natively here: a GPU that has it, or a CPU with AVX512-BF16 or AMX (elsewhere
    oneDNN emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def candidate_backends(bundle: Bundle, device: torch.device) -> list[Backend]:
    """What this version can run on ``device``, the fp32 reference first.

    On a GPU, ``torch`` already runs under bf16/fp16 autocast (``EMOTIONS_PRECISION=auto``), and
    INT8 QDQ graphs are a CPU optimisation (ONNX Runtime's CUDA provider dequantises them), so
    the GPU's candidates are torch and, with ``onnxruntime-gpu``, fp32 ONNX.
    """
    if bundle.imported is not None or bundle.model is None:
        return ["onnx"]
    candidates: list[Backend] = []
    if bundle.onnx_path is not None and (device.type == "cpu" or _ort_has_cuda()):
        candidates.append("onnx")
    candidates.append("torch")
    if device.type == "cpu":
        if bundle.int8_onnx_path is not None:
            candidates.append("onnx-int8")
        if bf16_supported(device):
            candidates.append("torch-bf16")
    return candidates


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def timed_pass(predictor: Predictor, batch: np.ndarray) -> float:
    """Seconds for one forward pass of ``batch`` (the default measurement)."""
    start = time.perf_counter()
    predictor.predict_array(batch)
    return time.perf_counter() - start


def _tuning_batch(bundle: Bundle, batch_size: int, probe: np.ndarray | None) -> np.ndarray:
    """A micro-batch of the version's input size: probe images (already checked to be of that
    size) repeated, else seeded noise."""
    size = bundle.spec.image_size
    if probe is not None and len(probe):
        reps = -(-batch_size // len(probe))
        return np.ascontiguousarray(np.concatenate([probe] * reps)[:batch_size])
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(batch_size, size, size, 3), dtype=np.uint8)


def _time_in_rounds(
    trials: list[Trial],
    predictors: dict[Backend, Predictor],
    batch: np.ndarray,
    rounds: int,
    measure: Callable[[Predictor, np.ndarray], float],
) -> None:
    """Time the eligible backends in interleaved rounds (one pass each per round, the order
    rotating) and keep each one's median.

    Timing each backend's passes back to back let a moment of load (a worker loads while the
    API and its neighbours start) land on one backend only: a worker once measured ONNX at
    68 img/s against torch's 117 while starting beside the API, and served torch, 15 % slower
    on that machine once quiet. Interleaved, a burst costs every backend alike.
    """
    seconds: dict[Backend, list[float]] = {name: [] for name in predictors}
    by_name = {trial.backend: trial for trial in trials}
    for round_index in range(rounds):
        order = list(seconds)
        shift = round_index % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            try:
                seconds[name].append(measure(predictors[name], batch))
            except Exception as exc:  # ran once, then failed: out of the running, reported
                log.warning("backend %s failed while being timed: %s", name, exc)
                by_name[name].reason = f"failed: {exc}"
                by_name[name].eligible = False
                del seconds[name], predictors[name]
    for name, times in seconds.items():
        by_name[name].images_per_second = len(batch) / max(statistics.median(times), 1e-9)


def autotune(
    bundle: Bundle,
    device: torch.device,
    build: Callable[[Backend], Predictor],
    *,
    batch_size: int,
    batches: int = 3,
    min_agreement: float = MIN_AGREEMENT,
    candidates: Sequence[Backend] | None = None,
    measure: Callable[[Predictor, np.ndarray], float] = timed_pass,
) -> Tuning:
    """Build, check and time each candidate; the fastest eligible one is returned, built.

    ``build`` makes a predictor for a backend; ``measure`` times one pass (injected by tests,
    which must never depend on real timings). The fp32 reference is always eligible, so a
    tuning always has an answer; a backend that fails to build is reported, not raised.
    """
    names = list(candidates or candidate_backends(bundle, device))
    probe = bundle.probe_images()
    if probe is not None and probe.shape[1:3] != (bundle.spec.image_size,) * 2:
        probe = None
    batch = _tuning_batch(bundle, batch_size, probe)
    trials: list[Trial] = []
    predictors: dict[Backend, Predictor] = {}
    reference: np.ndarray | None = None
    for name in names:
        trial = Trial(name)
        trials.append(trial)
        if probe is None and name not in EXACT and name != "onnx-int8":
            trial.reason = "no probe images to check agreement"
            continue  # can't be chosen: not worth building or timing
        try:
            predictor = build(name)
            if probe is not None:
                top1 = predictor.predict_array(probe).argmax(axis=1)
                if reference is None:
                    reference = top1
                trial.agreement = float((top1 == reference).mean())
            predictor.predict_array(batch)  # warm-up: allocations, kernel selection
        except Exception as exc:  # a backend that can't run here is a finding, not a failure
            trial.reason = f"failed: {exc}"
            log.warning("backend %s failed to run version's model: %s", name, exc)
            if len(trials) == 1:  # the reference itself: nothing to compare or fall back to
                raise
            continue
        if trial.agreement is not None and trial.agreement < min_agreement:
            trial.reason = f"agreement below {100 * min_agreement:.0f} %"
        else:
            trial.eligible = True
        predictors[name] = predictor  # timed even if it disagrees: the table shows the cost
    _time_in_rounds(trials, predictors, batch, max(1, batches), measure)
    eligible = [t for t in trials if t.eligible]
    best = max(eligible, key=lambda t: t.images_per_second or 0.0)
    for name in list(predictors):
        if name != best.backend:
            del predictors[name]  # free the losers' sessions and weights
    return Tuning(best.backend, predictors[best.backend], trials)
