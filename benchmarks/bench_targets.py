"""The speed targets of D2R's gradient step, measured the way they are defined: several fresh `bench_update.py`
processes per setting, the D2R / SB3 ratio of every run, their median, and whether the target holds.

    python benchmarks/bench_targets.py                        # 7 runs each of batch 320 / 1 thread and 1280 / 2
    python benchmarks/bench_targets.py --runs 3 --instructions avx2   # held to AVX2: a stand-in, see below

The targets: one D2R gradient step at most 2.0x SB3's ``SAC("MlpPolicy", net_arch=[400, 400, 400])`` step at batch
320 with one thread (the training campaign's setting) and at most 2.2x at batch 1280 with two threads. Every run is
one ``bench_update.py --no-network`` process (all models interleaved in it, median of its repeats); the runs of the
two settings alternate, so a slow spell of a shared machine falls on both. Besides the default, the table shows D2R
with torch's own products for its dense layers (as SB3's MLP computes them), where the default is oneDNN. Options
this script does not know go to every ``bench_update.py`` process (``--collect 150``, ``--malloc-defaults``, ...).

``--instructions avx2`` runs the processes with torch's kernels, oneDNN, MKL and d2r_sb3's compiled loops held to
AVX2 instructions (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
NUMBA_CPU_NAME=haswell``). On an AVX-512 CPU that is a stand-in for an AVX2-only one, not a substitute: caches,
clocks and memory stay those of the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from _common import add_instructions_flag, instruction_limits, markdown_table
from bench_update import D2R, D2R_TORCH_PRODUCTS

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setting:
    """One measured setting: batch, torch threads, the target ratio and the repeats / steps of each run."""

    batch: int
    threads: int
    target: float
    repeats: int
    steps: int

    @property
    def name(self) -> str:
        return f"batch {self.batch}, {self.threads} thread{'s' if self.threads > 1 else ''}"


SETTINGS = (Setting(320, 1, 2.0, repeats=9, steps=4), Setting(1280, 2, 2.2, repeats=7, steps=2))


def parse_setting(text: str) -> Setting:
    """``BATCHxTHREADS=TARGET`` (e.g. ``320x1=2.0``), with the default repeats and steps of the nearest default."""
    try:
        size, target = text.split("=")
        batch, threads = (int(part) for part in size.lower().split("x"))
        value = float(target)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write a setting as BATCHxTHREADS=TARGET, e.g. 320x1=2.0"
        ) from None
    if batch < 1 or threads < 1 or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: batch, threads and target must be positive")
    like = min(SETTINGS, key=lambda s: abs(s.batch - batch))
    return Setting(batch, threads, value, like.repeats, like.steps)


def run_once(
    setting: Setting, args: argparse.Namespace, env: dict[str, str], folder: Path, index: int
) -> dict:
    """One ``bench_update.py`` process for ``setting``: its JSON record."""
    out = folder / f"run_{setting.batch}x{setting.threads}_{index}.json"
    command = [
        sys.executable,
        str(HERE / "bench_update.py"),
        "--no-network",
        f"--batch={setting.batch}",
        f"--threads={setting.threads}",
        f"--repeats={args.repeats or setting.repeats}",
        f"--steps={args.steps or setting.steps}",
        f"--json={out}",
        *args.bench_args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_update.py failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def model_values(runs: list[dict], model: str, key: str) -> list[float]:
    """``model``'s ``key`` (``"ratio"``, ``"ms_per_step"``) in every run that timed it."""
    return [r[key] for run in runs for r in run["models"] if r["model"] == model]


def ratio_text(ratio: float, runs: int) -> str:
    """A median ratio as the runs' ratios are shown (two decimals), with a third where an even count of runs puts
    the median between two of them (``1.935``)."""
    text = f"{ratio:.3f}" if runs % 2 == 0 else f"{ratio:.2f}"
    return text[:-1] if runs % 2 == 0 and text.endswith("0") else text


def span(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def summary_rows(setting: Setting, runs: list[dict]) -> list[list[str]]:
    """The table rows of one setting, one per D2R variant: every run's ratio to SB3, their median, the target and
    whether it holds (at the median; and in every run, or not)."""
    reference_ms = model_values(runs, runs[0]["reference"], "ms_per_step")
    rows = []
    for model, products in ((D2R, "default"), (D2R_TORCH_PRODUCTS, "torch's")):
        values = model_values(runs, model, "ratio")
        if not values:
            continue  # torch's products are the default here: no second row
        middle = statistics.median(values)
        if middle > setting.target:
            verdict = "**not met**"
        elif max(values) > setting.target:
            verdict = "met at the median, not in every run"
        else:
            verdict = "met in every run"
        rows.append(
            [
                setting.name,
                products,
                str(len(values)),
                span(reference_ms),
                span(model_values(runs, model, "ms_per_step")),
                ", ".join(f"{v:.2f}" for v in values),
                f"**{ratio_text(middle, len(values))}x**",
                f"{setting.target}x",
                verdict,
            ]
        )
    return rows


HEADER = [
    "setting",
    "D2R's dense products",
    "runs",
    "SB3 ms",
    "D2R ms",
    "ratio, every run",
    "median",
    "target",
    "",
]


def machine_line(run: dict) -> str:
    machine = run["machine"]
    return (
        f"{machine['cpu']}; CPU flags {' '.join(machine['cpu_flags']) or '(none of interest)'}; instructions torch "
        f"uses: {machine['instructions']}; torch {machine['torch']}; CPU products {machine['cpu_products']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=7, help="bench_update.py processes per setting (default 7)"
    )
    parser.add_argument(
        "--setting",
        action="append",
        type=parse_setting,
        metavar="BATCHxTHREADS=TARGET",
        help="measure this setting instead of the two targets (repeatable), e.g. 320x1=2.0",
    )
    add_instructions_flag(parser)
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per run (default: 9 at batch 320, 7 at 1280)"
    )
    parser.add_argument(
        "--steps", type=int, help="gradient steps per repeat (default: 4 at batch 320, 2 at 1280)"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write every run's record and the verdicts as JSON"
    )
    args, args.bench_args = parser.parse_known_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    settings = args.setting or list(SETTINGS)
    env = dict(os.environ, **instruction_limits(args.instructions))
    runs: dict[Setting, list[dict]] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.runs):
            order = settings if index % 2 == 0 else settings[::-1]  # alternate which setting runs first
            for setting in order:
                runs[setting].append(run_once(setting, args, env, Path(folder), index))
                print(f"run {index + 1}/{args.runs}, {setting.name}: done", file=sys.stderr, flush=True)
    rows = {setting: summary_rows(setting, runs[setting]) for setting in settings}
    print(f"## D2R's gradient step against SB3's MLP SAC: {args.runs} run(s) per setting\n")
    print(markdown_table(HEADER, [row for setting in settings for row in rows[setting]]))
    first = runs[settings[0]][0]
    loads = [run["machine"]["load_average_1min"] for rs in runs.values() for run in rs]
    print(f"\n- machine: {machine_line(first)}")
    if args.instructions == "avx2":
        print("- held to AVX2 instructions: a stand-in for an AVX2-only CPU, not a measurement on one")
    if all(load is not None for load in loads):
        print(f"- load average (1 min) at the end of each run: {min(loads):.1f}-{max(loads):.1f}")
    per_run = "; ".join(
        f"{s.name}: --repeats {args.repeats or s.repeats} --steps {args.steps or s.steps}" for s in settings
    )
    print(f"- each run: one `bench_update.py --no-network` process ({per_run})")
    if args.json:
        record = {
            "instructions": args.instructions,
            "settings": [
                {**vars(setting), "runs": runs[setting], "rows": rows[setting]} for setting in settings
            ],
        }
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
