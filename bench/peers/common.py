"""What every peer shares with the pipeline and with each other: the model, built exactly as a
worker builds it, the per-request work (bytes -> decode -> resize -> normalise -> forward), the
driver's spec and result files, and the HTTP load client.

The peers must differ from the pipeline only in how requests reach the model: same bundle,
same backend (the one the pipeline worker reports serving), same torch/ONNX Runtime threads,
same allocator fix. So the servers call :func:`load_predictor` and :func:`predict_payloads`
here rather than their own preprocessing. Nothing here imports torch at import time:
:func:`load_predictor` applies the worker's allocator fix first.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from face_emotions.serving.predictor import Predictor

#: The backends' JSON answer is one probability per class; every answer is checked for it.
CLASSES = 5


@dataclass
class PeerSpec:
    """What a peer's driver process is given (written as JSON next to its logs).

    ``backend`` is a ``Settings.backend`` value (``onnx``, ``torch`` ...), never ``auto``
    unless the pipeline reported none: a peer must not tune its own and pick another one.
    """

    bundle_dir: str
    files: list[str]
    batch_size: int
    threads: int
    backend: str
    rounds: int
    connections: int
    workdir: str
    batch_wait_ms: float = 10.0
    start_timeout: float = 180.0

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> PeerSpec:
        return cls(**json.loads(path.read_text()))


@dataclass
class PeerResult:
    """A driver's answer: seconds per repetition of each path, with what it ran."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    images: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, path: Path) -> PeerResult:
        return cls(**json.loads(path.read_text()))


def load_predictor(
    bundle_dir: str | Path, backend: str, threads: int, batch_size: int
) -> Predictor:
    """The predictor a worker serves this bundle with, in the calling process.

    The allocator fix comes first (a no-op once applied), then torch's thread count, which the
    ONNX Runtime session copies: both as a worker with ``EMOTIONS_TORCH_THREADS`` has them.
    """
    from face_emotions.ops.malloc_tuning import tune_glibc_malloc

    tune_glibc_malloc()
    import torch

    torch.set_num_threads(threads)
    from face_emotions.modeling.bundle import load_bundle
    from face_emotions.serving.model_holder import serving_predictor
    from face_emotions.serving.predictor import resolve_device
    from face_emotions.settings import Settings

    settings = Settings(device="cpu", torch_threads=threads, batch_size=batch_size)
    settings = settings.model_copy(update={"backend": backend})
    predictor, _ = serving_predictor(load_bundle(Path(bundle_dir)), settings, resolve_device("cpu"))
    return predictor


def predict_payloads(predictor: Predictor, payloads: Sequence[bytes]) -> list[list[float]]:
    """One server-side batch: encoded images in, one probability list per image out.

    This is the whole of a peer's model work per batch, so it is also what a peer's own
    in-process limit times (:func:`limit_loop`).
    """
    from face_emotions.data.images import decode_image

    images = [decode_image(bytes(payload)) for payload in payloads]
    return predictor.predict_images(images).tolist()


def limit_loop(predictor: Predictor, payloads: Sequence[bytes], batch_size: int) -> None:
    """A peer's in-process limit: its batch function back to back over the same bytes."""
    for start in range(0, len(payloads), batch_size):
        predict_payloads(predictor, payloads[start : start + batch_size])


def reference(
    predictor: Predictor, payloads: Sequence[bytes], batch_size: int
) -> list[list[float]]:
    """This process's answers for every payload: what a peer's answers are checked against."""
    return [
        row
        for start in range(0, len(payloads), batch_size)
        for row in predict_payloads(predictor, payloads[start : start + batch_size])
    ]


def read_payloads(files: Sequence[str]) -> list[bytes]:
    """The files' bytes, read once: clients send from memory, servers decode them."""
    return [Path(name).read_bytes() for name in files]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``check()`` until truthy; raise TimeoutError naming ``what`` (never hang)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s (last error: {last})")


# -- the HTTP load client ----------------------------------------------------------------------


def http_load(
    url: str, payloads: Sequence[bytes], connections: int, timeout: float = 300.0
) -> tuple[float, list[list[float]]]:
    """POST every payload (one image per request) with ``connections`` requests in flight.

    Returns the seconds from the first request to the last answer, and the answers in payload
    order. aiohttp (the bench extra) keeps the client to one thread and little CPU, which on
    2 cores the server needs. Any non-200 or malformed answer raises.
    """
    return asyncio.run(_http_load(url, payloads, connections, timeout))


async def _http_load(
    url: str, payloads: Sequence[bytes], connections: int, timeout: float
) -> tuple[float, list[list[float]]]:
    import aiohttp

    answers: list[list[float]] = [[] for _ in payloads]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(payloads)):
        queue.put_nowait(index)
    headers = {"Content-Type": "application/octet-stream"}
    connector = aiohttp.TCPConnector(limit=connections)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def client() -> None:
            while not queue.empty():
                index = queue.get_nowait()
                async with session.post(url, data=payloads[index], headers=headers) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status} from {url}: {body[:300]!r}")
                answers[index] = parse_answer(body)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(connections, len(payloads)))))
        return time.perf_counter() - started, answers


def parse_answer(body: bytes) -> list[float]:
    """One image's probabilities from a peer's JSON answer (a list, or a dict holding one)."""
    value = json.loads(body)
    if isinstance(value, dict):
        value = value.get("probabilities", value)
    if not (isinstance(value, list) and len(value) == CLASSES):
        raise RuntimeError(f"unexpected answer: {body[:200]!r}")
    return [float(p) for p in value]


def max_abs_diff(answers: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> float:
    """Largest |Δp| between a peer's answers and this process's: proof of the same model."""
    return max(
        (
            abs(a - b)
            for row, ref in zip(answers, expected, strict=True)
            for a, b in zip(row, ref, strict=True)
        ),
        default=0.0,
    )


def driver_main(measure: Callable[[PeerSpec], PeerResult], argv: list[str]) -> int:
    """A peer driver's entry point (``python -m bench.peers.<peer> SPEC RESULT``).

    The parent's timeout sends SIGTERM: exiting through ``sys.exit`` runs the driver's
    ``finally`` blocks, which stop its server (Ray, TorchServe) instead of orphaning it.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    measure(PeerSpec.read(Path(argv[0]))).write(Path(argv[1]))
    return 0
