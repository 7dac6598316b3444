"""The speed-target report (benchmarks/bench_targets.py): its verdicts, and one real run of its processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch as th

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def targets(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their helpers as the folder's modules
    import bench_targets

    return bench_targets


def _run(ratios: dict[str, float]) -> dict:
    """A bench_update.py record with these ratios to SB3's step (SB3 at 50 ms)."""
    models = [{"model": "SB3", "ms_per_step": 50.0, "ratio": 1.0}]
    models += [{"model": name, "ms_per_step": 50.0 * r, "ratio": r} for name, r in ratios.items()]
    return {"reference": "SB3", "models": models}


def test_every_runs_ratio_the_median_and_whether_the_target_holds(targets):
    setting = targets.Setting(320, 1, 2.0, repeats=9, steps=4)
    runs = [
        _run({targets.D2R: 1.9, targets.D2R_TORCH_PRODUCTS: 2.3}),
        _run({targets.D2R: 2.1, targets.D2R_TORCH_PRODUCTS: 2.2}),
        _run({targets.D2R: 1.954, targets.D2R_TORCH_PRODUCTS: 2.4}),
    ]
    default, torch_products = targets.summary_rows(setting, runs)
    assert default[:3] == ["batch 320, 1 thread", "default", "3"]
    assert default[3:] == [
        "50.0-50.0",
        "95.0-105.0",
        "1.90, 2.10, 1.95",
        "**1.95x**",
        "2.0x",
        "met at the median, not in every run",
    ]
    assert torch_products[6:] == ["**2.30x**", "2.0x", "**not met**"]
    # Where torch's products are the default there is no second D2R row; a run entirely under the target says so.
    (only,) = targets.summary_rows(setting, [_run({targets.D2R: 1.5}), _run({targets.D2R: 1.77})])
    assert only[5:] == ["1.50, 1.77", "**1.635x**", "2.0x", "met in every run"]


@pytest.mark.parametrize("text", ["320", "320x1", "320x1=abc", "0x1=2.0", "320x=2.0"])
def test_a_malformed_setting_is_refused_with_the_expected_form(targets, text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="BATCHxTHREADS=TARGET|must be positive"):
        targets.parse_setting(text)


def test_a_real_run_held_to_avx2_instructions(tmp_path):
    """One bench_update.py process at a tiny setting, with torch, oneDNN and MKL held to AVX2 as the stand-in does:
    the record names the instructions torch used, and the table has the run's ratio."""
    out = tmp_path / "targets.json"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_targets.py"),
            "--runs=1",
            "--setting=20x1=50",
            "--instructions=avx2",
            "--repeats=1",
            "--steps=1",
            f"--json={out}",
            # passed on to bench_update.py: a short collection and warm-up
            "--collect=20",
            "--warmup-steps=1",
            "--settle-faults=1000000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    (setting,) = record["settings"]
    (run,) = setting["runs"]
    assert run["batch"] == 20 and run["threads"] == 1
    assert run["machine"]["instructions"].startswith("AVX2 (held there by ATEN_CPU_CAPABILITY=avx2")
    d2r = next(r for r in run["models"] if r["model"] == "D2R (D2RSAC, default MT10 network)")
    assert d2r["ms_per_step"] > 0 and setting["rows"][0][5] == f"{d2r['ratio']:.2f}"
    assert "| batch 20, 1 thread | default | 1 |" in done.stdout
    assert "a stand-in for an AVX2-only CPU" in done.stdout


def _table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


PRODUCTS = ("mkldnn::_linear_pointwise", "aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")


@pytest.mark.skipif(not hasattr(th.ops.mkldnn, "_linear_pointwise"), reason="this torch has no oneDNN linear")
def test_the_profile_counts_onednn_products_as_matrix_products():
    """profile_update.py with the ensemble layers on oneDNN: their products (``mkldnn::_linear_pointwise``) are
    in the matmul column, not in "other ops", and the page faults of both runs are reported."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_update.py"), "--batch=20", "--steps=1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "D2R_SB3_CPU_PRODUCTS": "onednn"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Minor page faults per step: " in done.stdout
    phases = _table_rows(done.stdout, "| phase |")
    matmul_column = sum(float(row[2]) for row in phases)
    operators = {row[0]: float(row[1]) for row in _table_rows(done.stdout, "| operator |")}
    assert operators.get("mkldnn::_linear_pointwise", 0.0) > 0.0
    listed_products = sum(ms for name, ms in operators.items() if name in PRODUCTS)
    # every listed product is in the column (each printed figure rounded to 0.1 ms)
    assert matmul_column >= listed_products - 0.05 * (len(phases) + len(PRODUCTS))
