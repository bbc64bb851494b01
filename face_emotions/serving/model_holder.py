"""ModelHolder: the model a worker serves, hot-reloaded without a restart.

The serving alias is checked every ``model_refresh_seconds`` and whenever a reload is requested
(promotion broadcasts one). A new version is downloaded and built on a background thread while
the old one keeps serving; callers pick up the swap at their next micro-batch, so no batch ever
mixes versions and no task fails or repeats because of a swap. A failed load is logged and the
old model stays.

A requested reload is awaited: the next micro-batch after a promotion's broadcast waits (at most
:data:`REQUESTED_RELOAD_WAIT_SECONDS`) for the new version instead of serving the old one, so a
job submitted after ``promote`` returned is served by the new champion, as its user expects.
Periodic checks never make a batch wait.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from face_emotions.modeling.bundle import Bundle
from face_emotions.modeling.bundle import load_bundle
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.serving.backend_tuning import Tuning
from face_emotions.serving.backend_tuning import autotune
from face_emotions.serving.backend_tuning import candidate_backends
from face_emotions.serving.backend_tuning import timed_pass
from face_emotions.serving.predictor import Predictor
from face_emotions.serving.predictor import resolve_device
from face_emotions.settings import Settings

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """No model can be served yet (no champion, registry unreachable); retry later."""


@dataclass(frozen=True)
class ServingModel:
    version: int
    predictor: Predictor
    #: The measurements behind ``backend`` when it was autotuned (``EMOTIONS_BACKEND=auto``).
    tuning: Tuning | None = None

    @property
    def backend(self) -> str:
        return self.predictor.backend

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:N``."""
        return str(self.predictor.device)


def choose_backend(requested: str, device_type: str, bundle: Bundle) -> str:
    """The backend an explicit ``EMOTIONS_BACKEND`` gives this version (``auto`` is tuned by
    :func:`~face_emotions.serving.backend_tuning.autotune`; here it means the fp32 default:
    ONNX Runtime on CPU when the version ships an ONNX file, torch otherwise).

    An imported version has no torch network: ONNX Runtime whatever was asked for. A version
    without the file a backend needs falls back to fp32, with a warning.
    """
    if bundle.imported is not None or bundle.model is None:
        return "onnx"
    if requested == "auto":
        return "onnx" if device_type == "cpu" and bundle.onnx_path is not None else "torch"
    if requested == "onnx-int8" and bundle.int8_onnx_path is None:
        log.warning(
            "backend onnx-int8 requested but this version has no INT8 variant (none made, or "
            "it failed its accuracy gate: see GET /api/v1/models); serving fp32"
        )
        return choose_backend("auto", device_type, bundle)
    if requested == "onnx" and bundle.onnx_path is None:
        log.warning("backend onnx requested but this version has no ONNX artefact; using torch")
        return "torch"
    return requested


def serving_predictor(
    bundle: Bundle,
    settings: Settings,
    device: torch.device,
    measure: Callable[[Predictor, np.ndarray], float] = timed_pass,
) -> tuple[Predictor, Tuning | None]:
    """The predictor a worker serves ``bundle`` with, and the measurements behind it.

    ``EMOTIONS_BACKEND=auto`` with more than one candidate: measured
    (:func:`~face_emotions.serving.backend_tuning.autotune`); otherwise the backend
    :func:`choose_backend` gives, without measuring. The benchmark's in-process limit calls
    this too, so it runs what the workers run.
    """

    def build(backend: str) -> Predictor:
        return Predictor(
            bundle,
            device=device,
            backend=backend,  # type: ignore[arg-type]
            precision=settings.precision,
            compile_model=settings.torch_compile and backend.startswith("torch"),
        )

    if settings.backend == "auto" and len(candidate_backends(bundle, device)) > 1:
        tuning = autotune(
            bundle,
            device,
            build,
            batch_size=settings.batch_size,
            batches=settings.autotune_batches,
            measure=measure,
        )
        return tuning.predictor, tuning
    return build(choose_backend(settings.backend, device.type, bundle)), None


#: How long a micro-batch waits for the version a promotion asked for (a load takes seconds; a
#: registry that hangs must not stall serving for longer).
REQUESTED_RELOAD_WAIT_SECONDS = 120.0


class ModelHolder:
    def __init__(
        self,
        settings: Settings,
        *,
        registry_factory: Callable[[], Registry] | None = None,
        clock: Callable[[], float] = time.monotonic,
        reload_generation: Callable[[], int] | None = None,
        on_swap: Callable[[int], None] | None = None,
        device: str | None = None,
        measure: Callable[[Predictor, np.ndarray], float] = timed_pass,
    ) -> None:
        """``device``: where this process runs its models (a worker's pool process passes the
        GPU it was assigned, see :mod:`face_emotions.serving.device_assignment`); default
        ``settings.device`` resolved as process 0. ``measure`` times one pass when
        ``EMOTIONS_BACKEND=auto`` tunes a load (tests inject one: timings are never asserted)."""
        self._measure = measure
        self.settings = settings
        self._registry_factory = registry_factory or (lambda: Registry(settings))
        self._registry: Registry | None = None
        self._clock = clock
        self._reload_generation = reload_generation
        self._on_swap = on_swap
        self._seen_generation = reload_generation() if reload_generation else 0
        self._lock = threading.Lock()
        self._current: ServingModel | None = None
        self._ready: ServingModel | None = None
        self._loader: threading.Thread | None = None
        self._next_check = 0.0
        self._refresh_requested = False
        #: The load in flight was asked for (a promotion): micro-batches wait for it.
        self._awaiting_request = False
        self._pinned: OrderedDict[int, ServingModel] = OrderedDict()
        self.device = resolve_device(device or settings.device)
        self.swaps = 0

    # -- public --------------------------------------------------------------------------

    def current(self) -> ServingModel:
        """The model to use for the next micro-batch (the swap point)."""
        current = self._swap_if_ready()
        if current is None:
            return self._load_first()
        self._maybe_start_refresh()
        loader = self._loader
        if self._awaiting_request and loader is not None and loader.is_alive():
            loader.join(REQUESTED_RELOAD_WAIT_SECONDS)
            current = self._swap_if_ready() or current
        return current

    def for_job(self, pinned_version: int | None) -> ServingModel:
        if pinned_version is None:
            return self.current()
        current = self._current
        if current is not None and current.version == pinned_version:
            return current
        return self.pinned(pinned_version)

    def pinned(self, version: int) -> ServingModel:
        """A specific version, kept in a small LRU cache beside the serving one."""
        with self._lock:
            cached = self._pinned.get(version)
            if cached is not None:
                self._pinned.move_to_end(version)
                return cached
        info = self.registry().get_version(version)
        model = self._build(info)
        with self._lock:
            self._pinned[version] = model
            while len(self._pinned) > self.settings.pinned_model_cache:
                evicted, _ = self._pinned.popitem(last=False)
                log.info("evicted pinned version %s from the cache", evicted)
        return model

    def poll(self) -> None:
        """Idle-time check: swap in a version that finished loading, start a load if one is due.

        A chunk in progress keeps the model it asked for until its next micro-batch, so a swap
        here never mixes versions in a batch; it only means an idle worker serves (and reports)
        the new champion without waiting for its next task.
        """
        if self._current is not None:
            self._swap_if_ready()
            self._maybe_start_refresh()

    @property
    def serving_version(self) -> int | None:
        return self._current.version if self._current else None

    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    # -- internals -------------------------------------------------------------------------

    def _swap_if_ready(self) -> ServingModel | None:
        swapped = None
        with self._lock:
            if self._ready is not None:
                old = self._current.version if self._current else None
                self._current, self._ready = self._ready, None
                self.swaps += 1
                swapped = self._current.version
                log.info("now serving version %s (was %s)", swapped, old)
            current = self._current
        if swapped is not None and self._on_swap is not None:
            try:
                self._on_swap(swapped)
            except Exception as exc:  # a heartbeat that failed must not fail a chunk
                log.debug("swap callback failed: %s", exc)
        return current

    def _alias_version(self) -> VersionInfo:
        try:
            info = self.registry().alias_version()
        except Exception as exc:
            raise ModelUnavailable(f"model registry unreachable: {exc}") from exc
        if info is None:
            raise ModelUnavailable(
                f"model {self.settings.model_name!r} has no version with alias "
                f"{self.settings.model_alias!r}; train and promote one first"
            )
        return info

    def _build(self, info: VersionInfo) -> ServingModel:
        try:
            bundle = load_bundle(self.registry().download(info))
        except RegistryError:
            raise
        except Exception as exc:
            raise ModelUnavailable(f"cannot load version {info.version}: {exc}") from exc
        predictor, tuning = serving_predictor(bundle, self.settings, self.device, self._measure)
        if tuning is not None:
            log.info(
                "version %s: backends measured on %s, %d px, batch %d:\n%s",
                info.version,
                self.device,
                bundle.spec.image_size,
                self.settings.batch_size,
                tuning.table(),
            )
        log.info(
            "loaded %s version %s (%s, %s, %s px)",
            info.name,
            info.version,
            bundle.spec.architecture,
            predictor.backend,
            bundle.spec.image_size,
        )
        return ServingModel(info.version, predictor, tuning)

    def _load_first(self) -> ServingModel:
        model = self._build(self._alias_version())
        with self._lock:
            if self._current is None:
                self._current = model
            self._next_check = self._clock() + self.settings.model_refresh_seconds
            return self._current

    def _due(self) -> bool:
        if self._reload_generation is not None:
            generation = self._reload_generation()
            if generation != self._seen_generation:
                self._seen_generation = generation
                self._refresh_requested = True
        return self._refresh_requested or self._clock() >= self._next_check

    def _maybe_start_refresh(self) -> None:
        if not self._due():
            return
        with self._lock:
            if self._loader is not None and self._loader.is_alive():
                return
            self._awaiting_request = self._refresh_requested
            self._refresh_requested = False
            self._next_check = self._clock() + self.settings.model_refresh_seconds
            self._loader = threading.Thread(target=self._refresh, name="model-reload", daemon=True)
            self._loader.start()

    def _refresh(self) -> None:
        try:
            info = self._alias_version()
            current = self._current
            if current is not None and info.version == current.version:
                return
            model = self._build(info)
        except Exception as exc:
            log.warning("model refresh failed, keeping version %s: %s", self.serving_version, exc)
            return
        with self._lock:
            self._ready = model

    def describe(self) -> dict[str, Any]:
        current = self._current
        return {
            "version": current.version if current else None,
            "backend": current.backend if current else None,
            "device": str(self.device),
            "pinned": list(self._pinned),
            "swaps": self.swaps,
        }
