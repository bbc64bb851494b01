"""``make stop``: stop what ``make demo`` started (API, worker, embedded Redis)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from scripts.demo import ROOT, stop_process


def main() -> int:
    run_dir = Path(os.environ.get("EMOTIONS_VAR_DIR", ROOT / "var")).resolve() / "run"
    stopped = [name for name in ("api", "worker", "redis") if stop_process(run_dir / f"{name}.pid")]
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
