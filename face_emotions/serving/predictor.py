"""Predictor: decoded images in, class probabilities out, one forward pass per micro-batch.

Training's evaluation, the local CLI and the worker all call this, so the preprocessing a model
was validated with is exactly the one it serves with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from typing import Literal
from typing import cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from face_emotions.data.images import load_batch_array
from face_emotions.modeling.bundle import Bundle
from face_emotions.modeling.import_spec import map_labels
from face_emotions.modeling.import_spec import preprocess
from face_emotions.modeling.import_spec import to_emotions
from face_emotions.modeling.onnx_import import run_session
from face_emotions.serving.device_assignment import assign_device

log = logging.getLogger(__name__)

#: ``torch`` and ``onnx`` are fp32 (``torch`` under ``EMOTIONS_PRECISION``); ``onnx-int8`` runs
#: the version's gated INT8 variant; ``torch-bf16`` runs torch under bf16 autocast.
Backend = Literal["torch", "onnx", "onnx-int8", "torch-bf16"]
BACKENDS: tuple[Backend, ...] = ("onnx", "onnx-int8", "torch", "torch-bf16")


def resolve_device(requested: str = "auto", process_index: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a fallback.

    ``auto`` and ``cuda`` on several GPUs give process ``process_index`` GPU
    ``process_index % n``; ``cuda:N`` beyond the visible devices, or a device that is none of
    auto, cpu, cuda, cuda:N, is an error (see :mod:`face_emotions.serving.device_assignment`).
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(assign_device(requested, process_index, count))


Precision = Literal["auto", "fp32", "bf16", "fp16"]


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the forward pass, None for plain fp32.

    ``auto`` is fp32 on CPU (bf16 autocast is slower than fp32 on CPUs without AMX, and the
    probabilities must match the ONNX path) and bf16 on GPUs that support it, else fp16.
    """
    if requested == "fp32" or (requested == "auto" and device.type != "cuda"):
        return None
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[requested]


class Predictor:
    """Holds one model in inference mode; thread-compatible (one call at a time per instance).

    On CUDA the uint8 batch is copied from pinned memory without blocking and normalised on the
    GPU (4x fewer bytes over PCIe than float32), the model runs channels-last under autocast,
    optionally compiled with ``torch.compile``.

    An imported version (``bundle.imported``) always runs in ONNX Runtime (CUDA provider on a
    GPU when the installed ONNX Runtime has it), fed as its spec says: size, gray/RGB/BGR,
    NCHW/NHWC, scale/mean/std; its outputs (logits or probabilities over its own labels) are
    mapped onto the five classes and renormalised.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str | torch.device = "cpu",
        backend: Backend = "torch",
        channels_last: bool = True,
        precision: Precision = "auto",
        compile_model: bool = False,
    ) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.imported = bundle.imported
        if self.imported is not None or bundle.model is None:
            backend = "onnx"
        self.backend: Backend = backend
        self.channels_last = channels_last
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._session = None
        # The model's GPU is the current one while it is set up (bf16 support, compilation),
        # not GPU 0: a process pinned to cuda:1 must not create a CUDA context on cuda:0.
        with self._on_device():
            self.autocast_dtype = (
                torch.bfloat16
                if backend == "torch-bf16"
                else resolve_precision(precision, self.device)
            )
            if self.imported is not None:
                self._session = _onnx_session(bundle, self.device)
                self._input_name = self._session.get_inputs()[0].name
                shape = self._session.get_inputs()[0].shape
                self._fixed_batch = 1 if shape and shape[0] == 1 else None
                self._mapping = map_labels(self.imported.labels)
            elif backend == "onnx":
                self._session = _onnx_session(bundle, self.device)
            elif backend == "onnx-int8":
                if bundle.int8_onnx_path is None:
                    raise RuntimeError(
                        "backend 'onnx-int8' requested but this version has no INT8 variant "
                        "(none was made, or it failed its accuracy gate)"
                    )
                self._session = _onnx_session(bundle, self.device, bundle.int8_onnx_path)
            else:
                assert bundle.model is not None
                self.model = bundle.model.to(self.device).eval()
                if channels_last:
                    self.model = self.model.to(memory_format=torch.channels_last)
                if compile_model:
                    # Typed as returning a plain callable; given a Module it returns an
                    # OptimizedModule, which is one.
                    self.model = cast(nn.Module, torch.compile(self.model, dynamic=True))
                self._mean = self._mean.to(self.device)
                self._std = self._std.to(self.device)

    def _on_device(self) -> AbstractContextManager[object]:
        """Make the model's GPU the calling thread's current CUDA device for a while.

        The current device is per thread and defaults to cuda:0; pinned host memory, autocast
        and compiled kernels use it. Tensors on an explicit device don't need it, but every
        thread that runs this predictor (task threads of ``--pool threads``, the dynamic
        batcher's) must use this process's GPU for everything else too.
        """
        if self.device.type == "cuda" and self.device.index is not None:
            return torch.cuda.device(self.device)
        return nullcontext()

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def batch_array(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Resize to the model's input size: the only per-image work, done before the forward."""
        return load_batch_array(images, self.spec.image_size)

    def normalise(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW on the model's device, for the whole batch."""
        x = torch.from_numpy(batch)
        # An ONNX session takes a host array (its CUDA provider copies it): normalise on CPU.
        if self.device.type == "cuda" and self._session is None:
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.channels_last and self._session is None:
            # NHWC storage already: channels-last needs no copy.
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def predict_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float32)
        return self.predict_array(self.batch_array(images))

    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) as float32 for a uint8 NHWC batch."""
        with self._on_device():
            return self._predict_array(batch)

    def model_input(self, batch: np.ndarray) -> np.ndarray:
        """The float32 array an imported model's ONNX graph receives for a uint8 NHWC batch."""
        if self.imported is None:
            return self.normalise(batch).contiguous().cpu().numpy()
        return preprocess(self.imported, batch)

    @torch.inference_mode()
    def _predict_array(self, batch: np.ndarray) -> np.ndarray:
        if self.imported is not None:
            outputs = run_session(
                self._session, self._input_name, preprocess(self.imported, batch), self._fixed_batch
            )
            return to_emotions(self.imported, self._mapping, outputs)
        x = self.normalise(batch)
        if self._session is not None:
            logits = self._session.run(None, {"images": x.contiguous().numpy()})[0]
            return _softmax(np.asarray(logits, dtype=np.float32))
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                logits = self.model(x)
        else:
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _onnx_session(bundle: Bundle, device: torch.device | None = None, path: Path | None = None):
    """A session on CPU; on ``device`` (a GPU) with the CUDA provider when ONNX Runtime has it.

    ``path``: another ONNX file of the version (its INT8 variant); default its fp32 model.
    """
    path = path or bundle.onnx_path
    if path is None:
        raise RuntimeError("backend 'onnx' requested but this model version has no ONNX artefact")
    import onnxruntime as ort

    providers: list[Any] = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        else:
            log.warning(
                "this ONNX Runtime has no CUDA provider (install onnxruntime-gpu); the ONNX "
                "model runs on CPU"
            )

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    # ONNX Runtime's idle threads spin-wait for the next pass by default: burnt CPU that the
    # worker's decode threads, database writes and (with dynamic batching) other tasks need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=providers)
