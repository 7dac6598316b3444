"""Shared helpers of the benchmark scripts: machine description, interleaved timing, Markdown tables.

Timing protocol: every candidate runs in the same process, interleaved (one repeat of
each in turn, the order alternating between repeats), after warm-up; we report the median over repeats and the
median of the per-repeat ratios, which cancels most of the drift on a shared machine. Where the candidates allocate
memory of changing sizes (D2R's per-call buffers follow the routes), the warm-up goes on until the process's heap
has settled (:func:`settle`): several models in one process need longer than one, and each fresh page costs a
page fault (about a microsecond in a VM) that a training process stops paying after its first steps.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch as th

from d2r_sb3.common import cpu_products
from d2r_sb3.common.memory import keep_freed_memory
from d2r_sb3.common.precision import cpu_flags, cpuinfo_field

_malloc = "glibc defaults"

LIMIT_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "NUMBA_CPU_NAME")
"""Environment variables that cap the instructions of torch's own kernels, oneDNN, MKL and d2r_sb3's compiled loops
(numba; ``haswell``: AVX2 and FMA, its own disk cache) below what the CPU has."""
AVX2_LIMITS = dict(zip(LIMIT_VARIABLES, ("avx2", "AVX2", "AVX2", "haswell"), strict=True))


def add_instructions_flag(parser) -> None:
    """``--instructions native|avx2``: run the measured processes as the CPU allows, or held to AVX2."""
    parser.add_argument(
        "--instructions",
        choices=("native", "avx2"),
        default="native",
        help="avx2: hold torch, oneDNN and MKL to AVX2 instructions (a stand-in for an AVX2-only CPU)",
    )


def instruction_limits(instructions: str) -> dict[str, str]:
    """The environment variables of an ``--instructions`` choice (none for ``native``)."""
    return dict(AVX2_LIMITS) if instructions == "avx2" else {}


def set_threads(threads: int, malloc_defaults: bool = False) -> None:
    """Use ``threads`` intra-op threads (and one inter-op thread) for the whole benchmark, and keep freed memory
    for reuse as the zoo's ``train.py`` does (:func:`d2r_sb3.keep_freed_memory`) unless ``malloc_defaults``."""
    global _malloc
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}.")
    th.set_num_threads(threads)
    if not malloc_defaults and keep_freed_memory():
        _malloc = "freed memory kept for reuse (keep_freed_memory, as train.py)"


def add_malloc_flag(parser) -> None:
    """``--malloc-defaults``: measure with glibc's default malloc thresholds (what a script that does not call
    ``keep_freed_memory`` gets)."""
    parser.add_argument(
        "--malloc-defaults", action="store_true", help="leave glibc's malloc thresholds at their defaults"
    )


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def machine_lines() -> list[str]:
    """Markdown bullet lines describing where and how a benchmark ran."""
    lines = [
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch threads: {th.get_num_threads()}",
        f"- CPU flags: {' '.join(cpu_flags()) or 'none of avx2 / avx512f / avx512_bf16 / amx (or unreadable)'}",
        f"- instructions torch uses: {instruction_set()}",
        f"- torch {th.__version__}, Python {platform.python_version()}",
        f"- malloc: {_malloc}",
        f"- float32 CPU products of the D2R / baseline dense layers: {_products_line()}",
    ]
    if th.cuda.is_available():
        lines.append(f"- GPU: {th.cuda.get_device_name(0)}")
    load = load_average()
    if load is not None:
        lines.append(
            f"- load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
        )
    return lines


def machine_record() -> dict:
    """The machine facts of :func:`machine_lines` that a run's JSON record keeps (``bench_update.py --json``)."""
    load = load_average()
    return {
        "cpu": cpu_model(),
        "cpu_flags": list(cpu_flags()),
        "instructions": instruction_set(),
        "torch": th.__version__,
        "cpu_products": cpu_products.cpu_products(),
        "load_average_1min": None if load is None else load[0],
    }


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or ``None`` where the platform has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def instruction_set() -> str:
    """The vector instructions torch's own kernels use here (``AVX512``, ``AVX2``, ...), with the variables that
    hold torch, oneDNN or MKL below what the CPU has (the AVX2 stand-in of ``bench_targets.py --instructions``)."""
    capability = th.backends.cpu.get_cpu_capability()
    limits = [f"{name}={os.environ[name]}" for name in LIMIT_VARIABLES if os.environ.get(name)]
    return capability + (f" (held there by {' '.join(limits)})" if limits else "")


def _products_line() -> str:
    onednn = cpu_products.uses_onednn(th.zeros(1))
    return f"{cpu_products.cpu_products()} ({'oneDNN' if onednn else 'torch default'} here)"


def minor_page_faults() -> int:
    """Minor page faults of this process so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # (Windows)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def settle(candidates: dict[str, Callable[[], None]], most_faults: int, max_rounds: int = 30) -> int:
    """Untimed rounds of every candidate until no call of any takes more than ``most_faults`` minor page faults
    (the heap has reached its steady size), at most ``max_rounds``.

    :return: the rounds run.
    """
    for rounds in range(1, max_rounds + 1):
        worst = 0
        for fn in candidates.values():
            before = minor_page_faults()
            fn()
            worst = max(worst, minor_page_faults() - before)
        if worst <= most_faults:
            return rounds
    return max_rounds


def interleaved(
    candidates: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    faults: dict[str, list[int]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every candidate, ``repeats`` times each, interleaved.

    :param candidates: name -> function to time (one call = one measured unit of work).
    :param repeats: measured calls per candidate.
    :param warmup: untimed calls per candidate first.
    :param sync: called before reading the clock (``torch.cuda.synchronize`` on a GPU).
    :param faults: if given, receives the minor page faults of every timed call, by candidate.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        for name in names if rep % 2 == 0 else reversed(names):
            sync()
            before = minor_page_faults()
            start = time.perf_counter()
            candidates[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            if faults is not None:
                faults.setdefault(name, []).append(minor_page_faults() - before)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over repeats of ``time[name] / time[reference]`` (the repeats were interleaved)."""
    return statistics.median(a / b for a, b in zip(times[name], times[reference], strict=True))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
