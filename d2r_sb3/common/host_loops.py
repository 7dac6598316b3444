"""Compiled loops on the host (numba): how they are compiled and cached, and how many threads they run on.

The CPU-side loops of the package (D2R's route choice and routed-block bookkeeping in
:mod:`d2r_sb3.d2r.compiled`, the optimiser pass of :mod:`d2r_sb3.common.fused_update`) are compiled with
:func:`jit`, which caches them on disk, and split their rows among :func:`loop_threads` threads when torch runs on
more than one.

Two guards on numba's disk cache (:func:`jit`):

* A cached function is compiled again when any module of :data:`COMPILED_MODULES` changes, not only its own: numba
  alone checks only the file a function is written in, so a function calling a compiled function of another
  module (the routed block's loop calls the mixing pass of :mod:`d2r_sb3.d2r.compiled`) would keep running the
  callee's old code after an edit or a ``git pull`` into an editable install.
* Processes read and write a function's cache one writer at a time (a file lock): numba saves an entry as "read the
  index, write the index, write the data file", so two processes compiling two versions of one function at once
  (float32 and float64, say: test workers, trials started together on a fresh install) could leave the index
  pointing one version at the other's code, which a later process would then run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np

try:
    import fcntl
except ImportError:  # (not on Windows: the caches are used without the lock there)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CACHE_LOCK_NAME",
    "COMPILED_MODULES",
    "PARALLEL_FROM",
    "cached_on_disk",
    "jit",
    "loop_threads",
    "part",
    "serial_as_none",
    "sources_stamp",
]

# Every module of the package that defines compiled functions (paths inside the package folder). Their contents
# together stamp each cached function (:func:`sources_stamp`); :func:`jit` refuses a function of any other module of
# the package, so a new compiled module cannot be left out.
COMPILED_MODULES = (
    "common/host_loops.py",
    "common/host_blas.py",
    "common/bias_relu.py",
    "common/fused_update.py",
    "d2r/compiled.py",
    "d2r/compiled_block.py",
)
_PACKAGE_FOLDER = Path(__file__).resolve().parents[1]
CACHE_LOCK_NAME = "d2r_sb3-cache.lock"
"""The lock file in a cache folder that numba's reads and writes of the package's functions take."""
# What this module touches of numba's cache of one function (numba.core.caching.IndexDataCacheFile).
_CACHE_FILE_PARTS = ("_source_stamp", "_cache_path", "load", "save", "_load_index")

# Below this many values a pass over a tensor runs on one thread (a parallel region costs microseconds to start).
PARALLEL_FROM = 65_536


def jit(function: Callable | None = None, **options) -> Callable:
    """``function`` compiled on first use, cached on disk where numba finds a writable place (the package's
    ``__pycache__``, ``NUMBA_CACHE_DIR`` or the user's cache folder); where it finds none (a read-only install and
    no writable home), compiled anew in every process, with a warning, instead of failing the import.
    ``options``: more of numba's ``njit`` options (``@jit(fastmath=...)``)."""
    if function is None:
        return lambda function: jit(function, **options)
    try:
        dispatcher = numba.njit(cache=True, nogil=True, **options)(function)
    except RuntimeError as error:  # numba: "cannot cache function ...: no locator available"
        warnings.warn(
            f"d2r_sb3 compiles {function.__name__} in every process: numba cannot cache it ({error}). "
            "Set NUMBA_CACHE_DIR to a writable folder to keep the compiled code between processes.",
            RuntimeWarning,
            stacklevel=2,
        )
        return numba.njit(nogil=True, **options)(function)
    _guard_cache(dispatcher, function)
    return dispatcher


def cached_on_disk(function: Callable) -> tuple[bool, str] | None:
    """Whether numba's disk cache holds code of ``function`` (compiled with :func:`jit`) for this machine and the
    package's current sources, for any argument types, and the cache's folder; ``None`` where that cannot be told
    (no disk cache, or a numba whose cache looks otherwise)."""
    cache_file = _cache_file(function)
    if cache_file is None:
        return None
    try:
        from numba.core.registry import cpu_target

        machine = cpu_target.target_context.codegen().magic_tuple()
        # (index keys: argument types, the machine the code was built for, the function's bytecode)
        found = any(key[1] == machine for key in cache_file._load_index())
    except Exception:  # (an unreadable index, another numba's keys: cannot tell)
        return None
    return found, str(cache_file._cache_path)


def sources_stamp(folder: Path = _PACKAGE_FOLDER) -> str:
    """A digest of the contents of the :data:`COMPILED_MODULES` under ``folder`` (the package's own folder by
    default): what the disk cache of every compiled function of the package is stamped with."""
    digest = hashlib.sha256()
    for name in COMPILED_MODULES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def _package_stamp() -> str | None:
    """:func:`sources_stamp` of the package, once per process (``None``: its files cannot be read)."""
    try:
        return sources_stamp()
    except OSError:  # (a package not installed as plain files: numba's own stamp stays)
        return None


def _guard_cache(dispatcher: Callable, function: Callable) -> None:
    """Stamp the disk cache of ``dispatcher`` (``function`` compiled) with :func:`sources_stamp` instead of numba's
    own stamp (the time and size of ``function``'s file) and have its reads and writes take the cache folder's lock,
    if ``function`` belongs to the package (see the module docstring)."""
    module = function.__module__
    if module.split(".")[0] != _PACKAGE_FOLDER.name:
        return
    path = "/".join(module.split(".")[1:]) + ".py"
    if path not in COMPILED_MODULES:
        raise ValueError(
            f"{module}.{function.__name__} is compiled, but {path} is not in "
            "d2r_sb3.common.host_loops.COMPILED_MODULES: add it there, so that the cached code of the functions "
            "calling it is renewed when it changes."
        )
    cache_file = _cache_file(dispatcher)
    if cache_file is None:
        return
    stamp = _package_stamp()
    if stamp is not None:
        cache_file._source_stamp = ("d2r_sb3 compiled modules", stamp)
    lock = os.path.join(cache_file._cache_path, CACHE_LOCK_NAME)
    cache_file.load = _locked(cache_file.load, lock, exclusive=False)
    cache_file.save = _locked(cache_file.save, lock, exclusive=True)


def _cache_file(function: Callable) -> Any:
    """numba's disk cache of one compiled function, or ``None`` (no disk cache, or one whose parts this module uses
    are missing): its index file and data files, handled by a ``numba.core.caching.IndexDataCacheFile``, which keeps
    the stamp (compared with the one in the index when it loads, saved with every entry), the folder, and loads and
    saves whole entries."""
    cache_file = getattr(getattr(function, "_cache", None), "_cache_file", None)
    if cache_file is None or not all(hasattr(cache_file, name) for name in _CACHE_FILE_PARTS):
        return None
    return cache_file


def _locked(method: Callable, lock: str, exclusive: bool) -> Callable:
    """``method`` run holding the file lock ``lock`` (shared or exclusive); unlocked where the lock file cannot be
    opened (no cache folder yet: nothing to read; a read-only one: nothing will be written) or locked (no
    ``fcntl``, a file system without locks)."""

    @functools.wraps(method)
    def run(*args):
        with contextlib.ExitStack() as stack:
            try:
                handle = stack.enter_context(open(lock, "a"))
            except OSError:
                handle = None
            if handle is not None and fcntl is not None:
                # (released when closed; a file system without locks, ENOLCK, runs it unlocked)
                with contextlib.suppress(OSError):
                    fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            return method(*args)

    return run


def serial_as_none(threads: int) -> int | None:
    """``threads`` as the compiled passes that choose between a serial and a parallel version take it: ``None``
    for one thread. A pass tests ``threads is None`` first, and numba prunes that branch's alternative from the
    code it compiles for a ``None`` argument, so a one-thread process never compiles the parallel versions (their
    parallel loops take seconds to compile)."""
    return threads if threads > 1 else None


# Whether numba's parallel loops share the CPU well in this process: (the process it was found in, the answer).
_parallel_layer: tuple[int, bool] | None = None


def loop_threads(threads: int) -> int:
    """How many threads the compiled loops run on when torch runs on ``threads``: as many (up to numba's pool,
    ``NUMBA_NUM_THREADS``) where numba's parallel loops run on its GNU OpenMP thread pool, else one. Sets
    numba's thread count (``numba.set_num_threads``) of the calling thread to the answer.

    With numba's own work queue (its threading layer where GNU OpenMP is not installed) a parallel pass ran no
    faster than torch's kernels between torch's parallel regions, and its TBB layer was not measured, so the
    loops stay serial with those. They also stay serial in a process forked from one that started the OpenMP
    pool: GNU OpenMP cannot be used after such a fork (numba ends the child instead). The first call with
    ``threads > 1`` starts the pool.
    """
    if threads <= 1:
        return 1
    global _parallel_layer
    pid = os.getpid()
    if _parallel_layer is None:
        _parallel_layer = (pid, _shares_threads())
    if _parallel_layer[0] != pid or not _parallel_layer[1]:
        return 1
    threads = min(threads, _pool_size())
    if numba.get_num_threads() != threads:  # (numba's count is per calling thread; its pool may be larger)
        numba.set_num_threads(threads)
    return threads


def _pool_size() -> int:
    """The threads of numba's pool (``NUMBA_NUM_THREADS``, by default the CPU's; numba's config module sets it
    from the environment at import, out of a type checker's sight)."""
    return numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]


def _shares_threads() -> bool:
    """Start numba's thread pool; whether it is the OpenMP one.

    Starting the pool sets the OpenMP thread count of the calling thread to the pool's size, and torch (on its
    OpenMP backend) takes its own count from there: a torch on one thread would run on all cores afterwards. So
    torch's count is put back."""
    import torch  # (only here: the loops themselves never touch torch)

    threads = torch.get_num_threads()
    try:
        _start_pool(min(2, _pool_size()))
        return numba.threading_layer() == "omp"
    except (ValueError, RuntimeError, ImportError):  # no threading layer could be loaded
        return False
    finally:
        torch.set_num_threads(threads)


@jit(parallel=True)
def _start_pool(threads):  # pragma: no cover - compiled
    out = np.zeros(threads)
    for part in numba.prange(threads):
        out[part] = part
    return out


@jit
def part(index, parts, n):  # pragma: no cover - compiled
    """The first item of part ``index`` of ``n`` items split into ``parts`` near-equal runs."""
    return index * n // parts
