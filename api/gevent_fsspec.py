"""fsspec (s3fs) under gevent: the API's S3 storage without blocking or refusing greenlets.

s3fs is asynchronous: fsspec runs its coroutines on an asyncio loop in an ``fsspecIO`` thread
and ``fsspec.asyn.sync`` makes each call synchronous. Under gevent's monkey patching that
thread is a greenlet of the worker's own thread, so ``sync`` finds a running loop in it and
refuses every call ("Calling sync() from within a running loop"): with ``s3://`` storage, every
upload answered 400. Two changes make it work, for the API's gevent workers only:

1. :func:`start_io_thread` starts fsspec's loop *before* gunicorn patches, so it runs in a real
   OS thread, and gives that loop a ``getaddrinfo`` of its own: asyncio's would run the lookup
   (aiohttp resolves ``minio`` in compose) on a thread pool whose threads, created after the
   patching, are greenlets of the worker's thread that the loop's thread can never wake;
2. :func:`install` (after patching) replaces ``sync`` with :func:`cooperative_sync`, which hands
   the coroutine to that loop and waits for it the gevent way: only the calling greenlet waits,
   the worker keeps serving every other connection.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import fsspec.asyn


def start_io_thread() -> None:
    """fsspec's IO loop and thread, created while ``threading`` is still the real one."""
    loop = fsspec.asyn.get_loop()
    loop.getaddrinfo = _native_getaddrinfo(loop)


def _native_getaddrinfo(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """``loop.getaddrinfo`` on a native thread with the unpatched resolver, whatever gevent
    patches later (both are captured now, before it does)."""
    lookup = socket.getaddrinfo
    native_thread = threading.Thread

    async def getaddrinfo(
        host: Any, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        answer = loop.create_future()

        def resolve() -> None:
            try:
                found = lookup(host, port, family, type, proto, flags)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, answer, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, answer, found, None)

        native_thread(target=resolve, name="fsspec-getaddrinfo", daemon=True).start()
        return await answer

    return getaddrinfo


def _settle(answer: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if answer.cancelled():
        return
    if error is not None:
        answer.set_exception(error)
    else:
        answer.set_result(result)


def cooperative_sync(
    loop: asyncio.AbstractEventLoop,
    func: Callable[..., Any],
    *args: Any,
    timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """``fsspec.asyn.sync`` for greenlets: same arguments, results, errors and time-out."""
    import gevent
    import gevent.event

    if loop is None or loop.is_closed():
        raise RuntimeError("fsspec's IO loop is not running")
    future = asyncio.run_coroutine_threadsafe(func(*args, **kwargs), loop)
    # The loop's thread may only wake the hub through an async watcher (thread-safe send()).
    watcher = gevent.get_hub().loop.async_()
    finished = gevent.event.Event()
    watcher.start(finished.set)
    future.add_done_callback(lambda _future: watcher.send())
    try:
        if not finished.wait(timeout):
            future.cancel()
            raise fsspec.asyn.FSTimeoutError
    finally:
        watcher.close()
    return future.result(timeout=0)


def install() -> None:
    """Route every fsspec/s3fs ``sync`` call through :func:`cooperative_sync`."""
    fsspec.asyn.sync = cooperative_sync
    # Modules that imported the name before this ran keep their own reference.
    for name in ("s3fs.core",):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "sync"):
            module.sync = cooperative_sync  # type: ignore[attr-defined]
