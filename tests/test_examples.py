"""The scripts in examples/ run as documented (small step counts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_saves_reloads_and_evaluates(tmp_path):
    save = tmp_path / "quickstart_model"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "quickstart.py"),
            "--benchmark",
            "reach,drawer-close",
            "--steps",
            "400",
            "--save",
            str(save),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread: robust to other busy processes
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "trained 400 env steps (100 updates)" in out
    assert "reach-v3" in out and "drawer-close-v3" in out and "mean success" in out
    assert save.with_suffix(".zip").is_file()
