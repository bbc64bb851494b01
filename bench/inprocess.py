"""In-process loops: the best one worker process could do (``limit``) and the backends.

These run in the benchmark's own process, which applied the worker's allocator fix before
importing torch (see :mod:`bench.run`), so they see exactly the tuning a worker gets: the same
``ModelHolder`` backend choice, channels-last, precision and thread count.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Protocol

import numpy as np

from face_emotions.data.images import decode_image
from face_emotions.data.images import load_batch_array
from face_emotions.modeling.bundle import load_bundle
from face_emotions.serving.decode_ahead import iter_decoded_batches
from face_emotions.serving.model_holder import serving_predictor
from face_emotions.serving.predictor import Predictor
from face_emotions.serving.predictor import resolve_device
from face_emotions.serving.predictor import resolve_precision
from face_emotions.settings import Settings


class Runner(Protocol):
    """Anything that turns a uint8 NHWC batch into class probabilities."""

    def predict_array(self, batch: np.ndarray) -> np.ndarray: ...


def worker_predictor(bundle_dir: Path, settings: Settings) -> Predictor:
    """The predictor a worker builds for this bundle: ``ModelHolder``'s own choice (measured
    when ``EMOTIONS_BACKEND=auto``), so the limit runs the pipeline's backend."""
    predictor, _ = serving_predictor(
        load_bundle(bundle_dir), settings, resolve_device(settings.device)
    )
    return predictor


def describe(predictor: Predictor) -> str:
    """``onnx`` / ``torch bf16`` ...: how a predictor runs, for the printed lines."""
    if predictor.backend.startswith("onnx"):
        return predictor.backend
    dtype = predictor.autocast_dtype
    precision = "fp32" if dtype is None else str(dtype).removeprefix("torch.")
    layout = ", channels-last" if predictor.channels_last else ""
    return f"torch {precision}{layout}"


def decoded_batches(paths: Sequence[Path], size: int, batch_size: int) -> list[np.ndarray]:
    """Decode and resize once, for loops that time only what follows decoding."""
    arrays = []
    for start in range(0, len(paths), batch_size):
        images = [decode_image(p) for p in paths[start : start + batch_size]]
        arrays.append(load_batch_array(images, size))
    return arrays


def warm(runner: Runner, arrays: Sequence[np.ndarray]) -> None:
    """First calls allocate arenas, pick kernels, compile: not what a steady worker pays."""
    for batch in arrays[:2]:
        runner.predict_array(batch)


def limit_variants(
    predictor: Predictor,
    paths: Sequence[Path],
    arrays: Sequence[np.ndarray],
    *,
    batch_size: int,
    decode_threads: int,
) -> dict[str, Callable[[], None]]:
    """Three loops over the same files, to be interleaved.

    ``overlapped`` is the worker's own structure (decode batch k+1 in a thread pool while batch
    k runs), ``sequential`` decodes then runs (on 2 cores the decode threads compete with the
    intra-op threads, so either can win); the limit is the faster. ``forward`` skips decoding
    and resizing: limit / forward is the share of time the model itself takes.
    """

    def overlapped() -> None:
        for batch in iter_decoded_batches(paths, batch_size, workers=decode_threads):
            predictor.predict_images(batch.images)

    def sequential() -> None:
        for start in range(0, len(paths), batch_size):
            predictor.predict_images([decode_image(p) for p in paths[start : start + batch_size]])

    def forward() -> None:
        for batch in arrays:
            predictor.predict_array(batch)

    return {"overlapped": overlapped, "sequential": sequential, "forward": forward}


# -- backends ----------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class _NumpyNormalised:
    """Shared preprocessing of the non-torch runners: the Predictor's arithmetic in numpy."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = (np.asarray(mean, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)
        self.std = (np.asarray(std, dtype=np.float32) * 255.0).reshape(1, 3, 1, 1)

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray((x - self.mean) / self.std)


class OnnxCudaRunner(_NumpyNormalised):
    """ONNX Runtime on the GPU (the worker has no such backend; this says if it should)."""

    def __init__(self, bundle_dir: Path) -> None:
        import onnxruntime as ort

        bundle = load_bundle(bundle_dir)
        if bundle.onnx_path is None:
            raise RuntimeError("the bundle has no ONNX file")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)")
        super().__init__(bundle.spec.mean, bundle.spec.std)
        self.session = ort.InferenceSession(
            str(bundle.onnx_path), providers=["CUDAExecutionProvider"]
        )

    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {"images": self.normalise(batch)})[0]
        return _softmax(np.asarray(logits, dtype=np.float32))


class OpenVinoRunner(_NumpyNormalised):
    """OpenVINO on the CPU, in fp32 (so its probabilities are comparable to torch's)."""

    def __init__(self, bundle_dir: Path, threads: int) -> None:
        import openvino as ov

        bundle = load_bundle(bundle_dir)
        if bundle.onnx_path is None:
            raise RuntimeError("the bundle has no ONNX file")
        super().__init__(bundle.spec.mean, bundle.spec.std)
        core = ov.Core()
        self.compiled = core.compile_model(
            str(bundle.onnx_path),
            "CPU",
            {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"},
        )

    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        logits = self.compiled(self.normalise(batch))[0]
        return _softmax(np.asarray(logits, dtype=np.float32))


@dataclass
class BackendSet:
    """Runners to compare, the baseline they are compared with, and why some are missing."""

    baseline: str
    headline: str | None = None  # the comparison the report leads with, when it ran
    runners: dict[str, Runner] = field(default_factory=dict)
    reduced_precision: set[str] = field(default_factory=set)
    missing: dict[str, str] = field(default_factory=dict)
    build_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, build: Callable[[], Runner]) -> None:
        started = time.perf_counter()
        try:
            self.runners[name] = build()
        except Exception as exc:  # an optional backend is reported missing, never fatal
            self.missing[name] = f"{type(exc).__name__}: {exc}"[:300]
        self.build_seconds[name] = round(time.perf_counter() - started, 2)

    def smoke(self, batch: np.ndarray) -> None:
        """Run every backend once: torch.compile and providers fail lazily, at the first call.

        A backend that fails is reported missing; only the baseline failing is fatal.
        """
        for name, runner in list(self.runners.items()):
            started = time.perf_counter()
            try:
                runner.predict_array(batch)
            except Exception as exc:
                if name == self.baseline:
                    raise
                del self.runners[name]
                self.missing[name] = f"failed at its first call: {type(exc).__name__}: {exc}"[:300]
            self.build_seconds[name] = round(
                self.build_seconds.get(name, 0.0) + time.perf_counter() - started, 2
            )


def backend_set(
    bundle_dir: Path, settings: Settings, *, threads: int, try_compile: bool, extras: bool = True
) -> BackendSet:
    """The backends worth comparing on this device.

    CPU: torch eager as the worker runs it (channels-last, fp32), the same in plain NCHW,
    ONNX Runtime (the worker's ``auto`` choice), OpenVINO when installed, and ``torch.compile``
    only when asked (its C++ build took over ten minutes on 2 cores). CUDA: torch fp32, torch
    under the worker's autocast, compiled, and ONNX Runtime's CUDA provider when installed.
    ``extras=False`` (the small mode) keeps only what the headline compares.
    """
    device = resolve_device(settings.device)

    def torch_predictor(**options: Any) -> Callable[[], Runner]:
        return lambda: Predictor(load_bundle(bundle_dir), device=device, **options)

    if device.type == "cuda":
        worker_precision = settings.precision if settings.precision != "fp32" else "auto"
        dtype = resolve_precision(worker_precision, device)
        result = BackendSet(baseline="torch fp32")
        result.add("torch fp32", torch_predictor(backend="torch", precision="fp32"))
        name = f"torch autocast {str(dtype).removeprefix('torch.')}"
        result.add(name, torch_predictor(backend="torch", precision=worker_precision))
        result.reduced_precision.add(name)
        compiled = "torch.compile + autocast"
        result.add(
            compiled,
            torch_predictor(backend="torch", precision=worker_precision, compile_model=True),
        )
        result.reduced_precision.add(compiled)
        result.add("onnxruntime (CUDA)", lambda: OnnxCudaRunner(bundle_dir))
        return result

    result = BackendSet(baseline="torch eager", headline="onnxruntime")
    result.add("torch eager", torch_predictor(backend="torch", precision="fp32"))
    if extras:
        result.add(
            "torch eager NCHW",
            torch_predictor(backend="torch", precision="fp32", channels_last=False),
        )
    result.add("onnxruntime", torch_predictor(backend="onnx"))
    if importlib.util.find_spec("openvino") is not None:
        result.add("openvino", lambda: OpenVinoRunner(bundle_dir, threads))
    else:
        result.missing["openvino"] = "not installed (pip install openvino)"
    if try_compile:
        result.add(
            "torch.compile",
            torch_predictor(backend="torch", precision="fp32", compile_model=True),
        )
    else:
        result.missing["torch.compile"] = (
            "skipped on CPU: inductor's C++ build of this model took over 10 min on 2 cores "
            "(--compile to try)"
        )
    return result


def probabilities(runner: Runner, arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([runner.predict_array(batch) for batch in arrays])


def forward_loop(runner: Runner, arrays: Sequence[np.ndarray]) -> Callable[[], None]:
    def run() -> None:
        for batch in arrays:
            runner.predict_array(batch)

    return run


# -- the worker's chunk code, in this process ----------------------------------------------


class ChunkLoop:
    """The worker's own ``classify_chunk`` over the same files, in this process.

    Same model holder (loaded from the registry), same decoding pool, same per-micro-batch
    SQLite transactions as a worker, but no Celery, no broker and no API: between the pure
    ``limit`` loop and the REST pipeline it tells whether time is lost in the chunk code
    (database writes, cancellation checks, heartbeats) or around it (processes competing for
    the cores). It writes to a database file of its own, which no worker or sweeper reads.
    """

    def __init__(self, settings: Settings, paths: Sequence[Path], batch_size: int) -> None:
        from face_emotions.jobs.database import create_db_engine
        from face_emotions.jobs.database import session_factory
        from face_emotions.jobs.migrate import upgrade
        from face_emotions.serving.model_holder import ModelHolder

        upgrade(settings.resolved_database_url)
        self.settings = settings
        self.paths = list(paths)
        self.batch_size = batch_size
        self.sessions = session_factory(create_db_engine(settings.resolved_database_url))
        self.holder = ModelHolder(settings)
        self.holder.current()

    def _job(self, paths: Sequence[Path]) -> tuple[Any, list[list[int]]]:
        from face_emotions.jobs import job_queries

        with self.sessions() as session:
            job = job_queries.create_job(
                session,
                source_type="folder",
                source="bench",
                images=[job_queries.NewImage(str(p), str(p)) for p in paths],
                batch_size=self.batch_size,
                chunk_size=self.batch_size * self.settings.chunk_batches,
            )
            session.commit()
            chunks = job_queries.chunk_image_ids(session, job.id)
            session.commit()
            return job.id, [chunks[key] for key in sorted(chunks)]

    def warm(self) -> None:
        """Two micro-batches through the whole path: engine, decode pool, first writes."""
        self.run(self.paths[: 2 * self.batch_size])

    def __call__(self) -> float:
        """Seconds to classify every chunk of a fresh job (creating it is not timed)."""
        return self.run(self.paths)

    def run(self, paths: Sequence[Path]) -> float:
        from face_emotions.serving.chunk_classifier import classify_chunk

        job_id, chunks = self._job(paths)
        started = time.perf_counter()
        for image_ids in chunks:
            classify_chunk(self.sessions, self.holder, job_id, image_ids, settings=self.settings)
        return time.perf_counter() - started
