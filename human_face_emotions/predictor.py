"""Predictor: decoded images in, class probabilities out, one forward pass per micro-batch.

Training's evaluation, the local CLI and the worker all call this, so the preprocessing a model
was validated with is exactly the one it serves with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from human_face_emotions.bundle import Bundle
from human_face_emotions.images import load_batch_array

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx"]


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    return torch.device(requested)


class Predictor:
    """Holds one model in inference mode; thread-compatible (one call at a time per instance)."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str | torch.device = "cpu",
        backend: Backend = "torch",
        channels_last: bool = True,
    ) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.backend: Backend = backend
        self.channels_last = channels_last
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self._session = None
        if backend == "onnx":
            self._session = _onnx_session(bundle)
        else:
            self.model = bundle.model.to(self.device).eval()
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def batch_array(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Resize to the model's input size: the only per-image work, done before the forward."""
        return load_batch_array(images, self.spec.image_size)

    def normalise(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW, vectorised over the whole batch."""
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        return (x - self._mean) / self._std

    def predict_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, len(self.spec.classes)), dtype=np.float32)
        return self.predict_array(self.batch_array(images))

    @torch.inference_mode()
    def predict_array(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) as float32 for a uint8 NHWC batch."""
        x = self.normalise(batch)
        if self._session is not None:
            logits = self._session.run(None, {"images": x.numpy()})[0]
            return _softmax(np.asarray(logits, dtype=np.float32))
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _onnx_session(bundle: Bundle):
    if bundle.onnx_path is None:
        raise RuntimeError("backend 'onnx' requested but this model version has no ONNX artefact")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(bundle.onnx_path), options, providers=["CPUExecutionProvider"])
