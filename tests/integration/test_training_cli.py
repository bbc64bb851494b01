"""``python -m training.train`` as a user runs it: a bad folder fails fast with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_missing_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            f"data.path={tmp_path / 'nope'}",
            f"output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "EMOTIONS_VAR_DIR": str(tmp_path / "var")},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "nope" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_b0_pretrained_offline_fails_fast(tmp_path: Path, sample_faces: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            f"data.path={sample_faces}",
            "model=efficientnet_b0",
            f"output_dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "EMOTIONS_VAR_DIR": str(tmp_path / "var"),
            "HF_HUB_OFFLINE": "1",
        },
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "efficientnet_lite0" in result.stderr
