"""TorchServe handler of the ``torchserve`` peer: encoded image bytes in, the worker's
predictor (decode, resize, normalise, forward), JSON probabilities out.

Packed into the model archive by :mod:`bench.peers.torchserve` with ``peer.json`` (bundle,
backend, threads, batch size) as an extra file. It does not subclass TorchServe's
``BaseHandler``: that one loads a model file its own way, and the point of the peer is to
serve with exactly the pipeline's predictor, so it calls :mod:`bench.peers.common` (the
repository is on ``PYTHONPATH`` of the TorchServe processes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Before torch loads in this module's process, where the worker's allocator fix applies best
# (mallopt still applies later, to later allocations, if TorchServe imported torch first).
from face_emotions.ops.malloc_tuning import tune_glibc_malloc

tune_glibc_malloc()


class EmotionHandler:
    """TorchServe's custom-handler protocol: ``initialize(context)`` then ``handle(data,
    context)`` once per server-side batch (one row per request)."""

    def __init__(self) -> None:
        self.predictor: Any = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        from bench.peers.common import load_predictor

        model_dir = Path(context.system_properties["model_dir"])
        spec = json.loads((model_dir / "peer.json").read_text())
        self.predictor = load_predictor(
            spec["bundle_dir"], spec["backend"], spec["threads"], spec["batch_size"]
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[list[float]]:
        from bench.peers.common import predict_payloads

        # One row per request: the body is under "data" or "body" (bytes or bytearray).
        payloads: list[bytes] = [row.get("data") or row["body"] for row in data]
        return predict_payloads(self.predictor, payloads)


_service = EmotionHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[list[float]] | None:
    """TorchServe's module-level entry point: the first call (``data`` None) initialises."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
