"""Ray Serve as a peer: ``python -m bench.peers.ray_serve SPEC RESULT`` (a driver process).

One replica holding the worker's predictor, requests batched by ``@serve.batch`` (up to the
pipeline's batch size, waiting at most ``batch_wait_ms`` for a batch to fill), enough
``max_ongoing_requests`` for a full batch to queue while one runs, and the batch computed in a
thread so the replica's event loop keeps accepting requests meanwhile. Access logs are off (a
log line per request is CPU the model needs on 2 cores). Measured through a
``DeploymentHandle`` from this driver and over HTTP (Serve's proxy), interleaved with this
peer's own in-process limit.

A driver process of its own, not the benchmark's: Ray's processes (GCS, raylet, workers) and
its imports stay out of the benchmark process, and the parent can kill it on a timeout.
Ray is started local only, without dashboard, with as many CPUs as the worker has threads, in
a temp directory of its own, and shut down at the end, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import common
from bench.stats import interleave

#: Ray Serve's own throughput settings, for every Ray process (set before ``ray.serve`` is
#: imported: it reads them at import). ``THROUGHPUT_OPTIMIZED`` (Ray >= 2.56) runs user code
#: on the replica's loop, gRPC between proxy and replica, buffered request logs, GC frozen
#: after start-up; the router keeps its own loop because the driver calls the handle from
#: synchronous code. Already set in the environment: kept (to compare settings).
RAY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def deployment(spec: common.PeerSpec) -> Any:
    """The Serve application: built in a function because the batch size and wait are the
    run's (``@serve.batch`` takes them at decoration); Ray pickles the class by value."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    @serve.deployment(
        num_replicas=1,
        max_ongoing_requests=4 * spec.batch_size,
        ray_actor_options={"num_cpus": spec.threads},
        logging_config=LoggingConfig(enable_access_log=False, log_level="WARNING"),
        # A model that cannot load fails the peer at once, not after Serve's retries.
        max_constructor_retry_count=1,
    )
    class EmotionPeer:
        def __init__(self, bundle_dir: str, backend: str, threads: int, batch: int) -> None:
            from bench.peers.common import load_predictor

            self.predictor = load_predictor(bundle_dir, backend, threads, batch)
            self.backend = self.predictor.backend

        @serve.batch(
            max_batch_size=spec.batch_size, batch_wait_timeout_s=spec.batch_wait_ms / 1000.0
        )
        async def batched(self, payloads: list[bytes]) -> list[list[float]]:
            from bench.peers.common import predict_payloads

            return await asyncio.to_thread(predict_payloads, self.predictor, payloads)

        async def predict(self, payload: bytes) -> list[float]:
            return await self.batched(payload)

        def serving_backend(self) -> str:
            return str(self.backend)

        async def __call__(self, request: Any) -> list[float]:
            return await self.batched(await request.body())

    # ``@serve.deployment`` made the class a Deployment (typed as the class, or Any without
    # Ray installed): Any either way, so mypy passes with and without the extra.
    app: Any = EmotionPeer
    return app.bind(spec.bundle_dir, spec.backend, spec.threads, spec.batch_size)


def measure(spec: common.PeerSpec) -> common.PeerResult:
    payloads = common.read_payloads(spec.files)
    # First: the allocator fix must come before torch (and Ray's own imports) load.
    predictor = common.load_predictor(spec.bundle_dir, spec.backend, spec.threads, spec.batch_size)
    for name, value in RAY_ENV.items():
        os.environ.setdefault(name, value)
    import ray
    from ray import serve

    expected = common.reference(predictor, payloads, spec.batch_size)
    port = common.free_port()
    # Short path: Ray's socket names must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Replicas are Ray worker processes: they need the repository (``bench``) on their path.
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    try:
        ray.init(
            num_cpus=spec.threads,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
            namespace="face-emotions-bench",
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        handle = serve.run(deployment(spec), name="emotions", route_prefix="/predict")
        load_seconds = time.perf_counter() - started
        url = f"http://127.0.0.1:{port}/predict"
        backend = handle.serving_backend.remote().result(timeout_s=spec.start_timeout)

        def via_handle() -> list[list[float]]:
            responses = [handle.predict.remote(p) for p in payloads]
            return [r.result(timeout_s=300) for r in responses]

        # Warm: arenas, kernels, the proxy's connections; and the same answers as in-process.
        _, answers = common.http_load(url, payloads, spec.connections)
        handle_answers = via_handle()

        def handle_path() -> None:
            via_handle()

        def http_path() -> float:
            return common.http_load(url, payloads, spec.connections)[0]

        def limit() -> None:
            common.limit_loop(predictor, payloads, spec.batch_size)

        samples = interleave(
            {"limit": limit, "handle": handle_path, "HTTP": http_path}, len(payloads), spec.rounds
        )
        return common.PeerResult(
            samples={name: s.seconds for name, s in samples.items()},
            images=len(payloads),
            settings={
                "ray": ray.__version__,
                "backend": backend,
                "replicas": 1,
                "num_cpus": spec.threads,
                "max_batch_size": spec.batch_size,
                "batch_wait_timeout_s": spec.batch_wait_ms / 1000.0,
                "max_ongoing_requests": 4 * spec.batch_size,
                "http_connections": spec.connections,
                "deploy_seconds": round(load_seconds, 1),
                "environment": {name: os.environ[name] for name in RAY_ENV},
            },
            notes=[
                f"Ray Serve {ray.__version__}: 1 replica ({spec.threads} CPUs), @serve.batch "
                f"max_batch_size={spec.batch_size}, batch_wait_timeout_s="
                f"{spec.batch_wait_ms / 1000.0}, max_ongoing_requests={4 * spec.batch_size}, "
                "batch computed in a thread, access log off, "
                + " ".join(f"{k}={os.environ[k]}" for k in RAY_ENV)
                + "; handle: every request submitted "
                f"at once from the driver; HTTP: {spec.connections} connections"
            ],
            max_abs_diff=max(
                common.max_abs_diff(answers, expected),
                common.max_abs_diff(handle_answers, expected),
            ),
        )
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception as exc:
                print(f"ray_serve: serve.shutdown failed: {exc}", file=sys.stderr)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(common.driver_main(measure, sys.argv[1:]))
