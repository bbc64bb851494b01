"""``make stop``: stop what ``make demo`` started (API, worker, trainer, embedded Redis).

The demo has exited by now; the pid files it left in ``var/run`` are all that names its
services, so this goes through them (see :func:`scripts.launcher.stop_process`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from scripts.demo import SERVICES
from scripts.launcher import ROOT
from scripts.launcher import stop_process


def main() -> int:
    run_dir = Path(os.environ.get("EMOTIONS_VAR_DIR", ROOT / "var")).resolve() / "run"
    stopped = [name for name in SERVICES if stop_process(run_dir / f"{name}.pid")]
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
