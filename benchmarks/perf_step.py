"""Where the time of a gradient step goes, sampled from outside the process by Linux ``perf``.

    python benchmarks/perf_step.py                                   # D2R and SB3's MLP SAC, batch 320, 1 thread
    python benchmarks/perf_step.py --batch 1280 --threads 2 --instructions avx2

One process holds both models on the same MT10 replay data and trains them in interleaved rounds (``--steps`` gradient
steps of one, then of the other, the order alternating), as ``bench_update.py`` times them, while ``perf record``
samples it (``cpu-clock``, ``--frequency`` samples per second of each thread's CPU time). A sample belongs to the
model whose round was running at its time; the samples between rounds are dropped. Each sample is put in one kind of
code by the function it landed in: oneDNN's generated product kernels, MKL's products, other generated code,
torch's other kernels (elementwise, reductions, gathers), torch's dispatch and bookkeeping, the Python interpreter,
numpy, malloc, libc's memory copies, OpenMP's waiting threads, the OS kernel. The table gives each kind in
milliseconds per gradient step, for the main thread and for torch's other threads, and D2R's excess over SB3's step.

Unlike ``torch.profiler`` (``profile_update.py``) sampling adds no work to each operator and allocates nothing in the
process, so the operators keep their real cost; the price is that it sees functions, not operators or phases.
A thread that waits without spinning (descheduled, sleeping) takes no samples: the main thread's "not on a CPU"
row is the step's time that no sample accounts for.

Needs ``perf`` (Debian: ``linux-perf``) and the right to attach to one's own processes
(``kernel.perf_event_paranoid`` at most 2, the usual default, or root).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from _common import add_instructions_flag, instruction_limits, machine_lines, markdown_table

MODELS = {"SB3": "SB3 SAC, MlpPolicy [400, 400, 400]", "D2R": "D2R (D2RSAC, default MT10 network)"}

KINDS = (
    "products: oneDNN (generated code)",
    "products: MKL",
    "other generated code (fbgemm's embedding_bag)",
    "torch kernels (elementwise, reductions, gathers)",
    "torch dispatch and bookkeeping",
    "Python interpreter",
    "numpy",
    "malloc / free",
    "memory copies (libc)",
    "OpenMP (waiting threads spin)",
    "OS kernel (page faults, system calls)",
    "other",
)
OFF_CPU = "not on a CPU (main thread)"
RECORD_OPTIONS = (
    "-k",
    "CLOCK_MONOTONIC",
    "-e",
    "cpu-clock",
)  # sample times on the clock the rounds are timed with
# Parts of the names of torch's compute loops (the rest of libtorch is dispatch and bookkeeping); "6native" is
# at::native in a name perf could not demangle.
_KERNEL_MARKS = ("at::native::", "Vectorized", "Sleef_", "TensorIterator", "copy_same_type", "6native")


def kind_of(symbol: str, library: str) -> str:
    """The kind of code (one of :data:`KINDS`) of a sample in ``symbol`` of ``library`` (a path, as ``perf script``
    prints it)."""
    name = os.path.basename(library)
    if name.startswith("perf-") and name.endswith(".map"):
        # Anonymous executable memory: code generated at run time. oneDNN names its kernels (jit_...) in the map
        # when ONEDNN_JIT_PROFILE=2, which the sampled process gets.
        return KINDS[0] if symbol.startswith("jit_") else KINDS[2]
    if name.startswith(("libtorch", "libc10")):
        return _torch_kind(symbol)
    if name.startswith(("libc.so", "libc-")):
        if symbol.startswith(("__mem", "mem")):
            return KINDS[8]
        if any(part in symbol for part in ("malloc", "free", "_int_", "chunk", "consolidate", "tcache")):
            return KINDS[7]
        return KINDS[11]
    if "libgomp" in name or "libiomp" in name:
        return KINDS[9]
    if name.startswith("[kernel"):
        return KINDS[10]
    if name.startswith(("libpython", "python")):
        return KINDS[5]
    return KINDS[6] if "numpy" in library else KINDS[11]


def _torch_kind(symbol: str) -> str:
    """The kind of a function in torch's libraries, which hold MKL too."""
    if symbol.startswith("mkl_blas") or re.fullmatch(r"L\w*gas_\d+", symbol):
        # (MKL's assembly routines are labels such as L_loop32gas_1 and LSUMgas_1, under its sdot)
        return KINDS[1]
    if symbol.startswith("mkl_vml") or symbol.endswith("_cout_rare"):
        return KINDS[3]  # MKL's elementwise math (the sqrt of torch's unfused Adam)
    return KINDS[3] if any(mark in symbol for mark in _KERNEL_MARKS) else KINDS[4]


def short_name(symbol: str, width: int = 100) -> str:
    """A readable name for a function: for torch's templated compute loops the kernels they instantiate
    (``add_kernel``, ``compare_base_kernel / max_kernel_impl``), else the name cut to ``width`` characters."""
    kernels = list(dict.fromkeys(re.findall(r"\b(\w+_kernel\w*|\w+_impl)\b", symbol)))
    if kernels and len(symbol) > width:
        return " / ".join(kernels[:2])
    return symbol if len(symbol) <= width else symbol[: width - 3] + "..."


class Sample(NamedTuple):
    thread: int
    time: float  # seconds of CLOCK_MONOTONIC (perf record -k CLOCK_MONOTONIC)
    kind: str
    symbol: str


def parse_samples(text: str) -> list[Sample]:
    """The samples of ``perf script -F tid,time,ip,sym,dso`` output, one per line:
    ``TID TIME: ADDRESS SYMBOL (LIBRARY)``; other lines are skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line.endswith(")") or " (" not in line:
            continue
        head, library = line[:-1].rsplit(" (", 1)
        fields = head.split(None, 3)
        if len(fields) < 3 or not fields[0].isdigit() or not fields[1].endswith(":"):
            continue
        symbol = fields[3].strip() if len(fields) == 4 else "[unknown]"
        samples.append(Sample(int(fields[0]), float(fields[1][:-1]), kind_of(symbol, library), symbol))
    return samples


class Round(NamedTuple):
    model: str
    start: float
    end: float


def assign(samples: list[Sample], rounds: list[Round]) -> dict[str, list[Sample]]:
    """Every sample taken during a round, by the round's model (rounds do not overlap)."""
    rounds = sorted(rounds, key=lambda r: r.start)
    starts = [r.start for r in rounds]
    by_model: dict[str, list[Sample]] = {r.model: [] for r in rounds}
    for sample in samples:
        i = bisect.bisect_right(starts, sample.time) - 1
        if i >= 0 and sample.time <= rounds[i].end:
            by_model[rounds[i].model].append(sample)
    return by_model


def child(args: argparse.Namespace) -> None:
    """The sampled process: build the models, warm up, then train them in alternating rounds until told to stop."""
    from _common import set_threads
    from bench_update import build_models

    set_threads(args.threads)
    env, built = build_models(args.batch, args.collect, seed=0)
    models = {name: built[MODELS[name]] for name in args.models}
    for model in models.values():
        model.train(args.warmup_steps, args.batch)
    work = Path(args.workdir)
    (work / "machine.txt").write_text("\n".join(machine_lines()))
    (work / "ready").write_text(str(os.getpid()))
    rounds: list[Round] = []
    order = list(models)
    while not (work / "stop").exists():
        for name in order:
            start = time.monotonic()  # the clock perf stamps its samples with (-k CLOCK_MONOTONIC)
            models[name].train(args.steps, args.batch)
            rounds.append(Round(name, start, time.monotonic()))
        order.reverse()
    (work / "rounds.json").write_text(json.dumps(rounds))
    env.close()


def record(args: argparse.Namespace, perf: str) -> tuple[list[Sample], list[Round], int, str]:
    """Run the models' process under ``perf record``: its samples, its rounds, its pid and its machine lines."""
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        command = [
            sys.executable,
            __file__,
            "--child",
            f"--workdir={workdir}",
            f"--models={','.join(args.models)}",
            f"--batch={args.batch}",
            f"--threads={args.threads}",
            f"--steps={args.steps}",
            f"--collect={args.collect}",
            f"--warmup-steps={args.warmup_steps}",
        ]
        env = dict(os.environ, ONEDNN_JIT_PROFILE="2", **instruction_limits(args.instructions))
        process = subprocess.Popen(command, env=env, cwd=Path(__file__).parent)
        try:
            while not (work / "ready").exists():
                if process.poll() is not None:
                    raise SystemExit(
                        f"The models' process ended before training (exit status {process.returncode})."
                    )
                time.sleep(0.2)
            pid = int((work / "ready").read_text())
            data = work / "perf.data"
            perf_record = [perf, "record", *RECORD_OPTIONS, "-F", str(args.frequency)]
            recorded = subprocess.run(
                [*perf_record, "-p", str(pid), "-o", str(data), "--", "sleep", str(args.seconds)],
                capture_output=True,
                text=True,
            )
            (work / "stop").touch()
            if process.wait(timeout=600) != 0:
                raise SystemExit(f"The models' process failed (exit status {process.returncode}).")
            if recorded.returncode != 0 or not data.exists():
                raise SystemExit(
                    f"perf record failed (exit status {recorded.returncode}): {recorded.stderr.strip()[-600:]}\n"
                    "perf needs the right to attach to this user's processes: run as root or set "
                    "kernel.perf_event_paranoid to 2 or lower (sudo sysctl kernel.perf_event_paranoid=2)."
                )
            script = subprocess.run(
                [perf, "script", "-i", str(data), "-F", "tid,time,ip,sym,dso"], capture_output=True, text=True
            )
            if script.returncode != 0:
                raise SystemExit(f"perf script failed: {script.stderr.strip()[-600:]}")
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
            # the symbol map oneDNN wrote where perf looks for it (ONEDNN_JIT_PROFILE=2), read by perf script above
            Path("/tmp", f"perf-{process.pid}.map").unlink(missing_ok=True)
        rounds = [Round(*r) for r in json.loads((work / "rounds.json").read_text())]
        return parse_samples(script.stdout), rounds, pid, (work / "machine.txt").read_text()


class Breakdown(NamedTuple):
    ms_per_step: float
    steps: int
    main: defaultdict[str, float]  # ms per step of every kind on the main thread
    others: defaultdict[str, float]  # the same, torch's other threads together
    symbols: defaultdict[tuple[str, str], float]  # ms per step of every (kind, function), all threads


def breakdown(
    samples: list[Sample], rounds: list[Round], steps_per_round: int, pid: int, frequency: int
) -> Breakdown:
    """One model's time per step and its split by kind, from its ``rounds`` and the ``samples`` taken in them."""
    steps = len(rounds) * steps_per_round
    ms_per_step = sum(r.end - r.start for r in rounds) / steps * 1000
    main: defaultdict[str, float] = defaultdict(float)
    others: defaultdict[str, float] = defaultdict(float)
    symbols: defaultdict[tuple[str, str], float] = defaultdict(float)
    ms = 1000 / frequency / steps  # one sample, in ms per step
    for sample in samples:
        (main if sample.thread == pid else others)[sample.kind] += ms
        symbols[sample.kind, sample.symbol] += ms
    main[OFF_CPU] = max(ms_per_step - sum(main.values()), 0.0)
    return Breakdown(ms_per_step, steps, main, others, symbols)


def perf_can_record() -> bool:
    """Whether ``perf`` is on the PATH and records here with the options this script uses."""
    perf = shutil.which("perf")
    if perf is None:
        return False
    probe = [perf, "record", *RECORD_OPTIONS, "-o", os.devnull, "--", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="SB3,D2R", help="comma-separated, from: SB3, D2R")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long perf samples the process")
    parser.add_argument("--steps", type=int, default=2, help="gradient steps per round")
    parser.add_argument(
        "--frequency", type=int, default=999, help="samples per second of a thread's CPU time"
    )
    add_instructions_flag(parser)
    parser.add_argument(
        "--symbols",
        type=int,
        default=0,
        metavar="N",
        help="also list each model's N costliest functions per kind",
    )
    parser.add_argument("--collect", type=int, default=150, help="vector env steps collected for the replay")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed gradient steps per model first")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    if (
        not args.models
        or any(name not in MODELS for name in args.models)
        or len(set(args.models)) < len(args.models)
    ):
        parser.error(f"--models: {args.models} is not a list of distinct names from {', '.join(MODELS)}.")
    if args.steps < 1 or args.seconds <= 0 or args.frequency < 1:
        parser.error("--steps, --seconds and --frequency must be positive.")
    return args


def report(args: argparse.Namespace, results: dict[str, Breakdown], rounds: list[Round]) -> str:
    """The Markdown table of every kind by model and thread, and a line per model."""
    models = args.models
    rows = []
    for kind in (*KINDS, OFF_CPU):
        row = [kind]
        for name in models:
            others = f"{results[name].others[kind]:.1f}" if args.threads > 1 else "-"
            row += [f"{results[name].main[kind]:.1f}", others]
        if len(models) == 2:
            row.append(f"{results[models[1]].main[kind] - results[models[0]].main[kind]:+.1f}")
        rows.append(row)
    header = ["kind of code (ms per step)"]
    for name in models:
        header += [f"{name} main thread", f"{name} other threads"]
    if len(models) == 2:
        header.append(f"{models[1]} - {models[0]}, main thread")
    lines = [
        f"## Where a gradient step's time goes (perf, batch {args.batch}, {args.threads} thread(s))\n",
        markdown_table(header, rows),
        "",
    ]
    for name in models:
        r = results[name]
        lines.append(
            f"- {name}: {r.ms_per_step:.1f} ms per step over {r.steps} steps in rounds of {args.steps}"
        )
    if len(models) == 2:
        # The i-th round of one model and the i-th of the other ran next to each other.
        first, second = ([r for r in rounds if r.model == name] for name in models)
        paired = [(b.end - b.start) / (a.end - a.start) for a, b in zip(first, second, strict=False)]
        lines.append(
            f"- {models[1]} / {models[0]}: {statistics.median(paired):.2f} (median over paired rounds)"
        )
    for name in models if args.symbols else ():
        lines.append(
            f"\n### {name}: the {args.symbols} costliest functions of each kind (ms per step, all threads)\n"
        )
        for kind in KINDS:
            mine = [(f, ms) for (k, f), ms in results[name].symbols.items() if k == kind]
            top = sorted(mine, key=lambda item: -item[1])[: args.symbols]
            if top:
                lines.append(f"- {kind}: " + "; ".join(f"{ms:.2f} `{short_name(f)}`" for f, ms in top))
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("perf_step.py needs Linux perf on the PATH (Debian: apt install linux-perf).")
    samples, rounds, pid, machine = record(args, perf)
    if not samples:
        raise SystemExit("perf recorded no samples of the models' process.")
    first, last = min(s.time for s in samples), max(s.time for s in samples)
    rounds = [r for r in rounds if first <= r.start and r.end <= last]
    by_model = assign(samples, rounds)
    results: dict[str, Breakdown] = {}
    for name in args.models:
        mine = [r for r in rounds if r.model == name]
        if len(mine) < 2:
            raise SystemExit(f"Fewer than two rounds of {name} ran while perf sampled: raise --seconds.")
        results[name] = breakdown(by_model[name], mine, args.steps, pid, args.frequency)
    print(report(args, results, rounds))
    print(f"- sampled {last - first:.1f} s with perf record -e cpu-clock -F {args.frequency}")
    if args.instructions == "avx2":
        print("- held to AVX2 instructions: a stand-in for an AVX2-only CPU, not a measurement on one")
    print(machine)  # as the sampled process saw it (threads, instructions, malloc)


if __name__ == "__main__":
    main()
