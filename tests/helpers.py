"""Helpers several test files share: tiny network settings and running a zoo command in-process."""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Any

import pytest
import torch as th

TINY_D2R = dict(n_modules=4, module_dim=16, encoder_sizes=[32, 32], gate_sizes=[16])
"""A D2R network small enough for tests on any CPU (the default is 16 modules of 400 units)."""
TINY_D2R_FLAG = "policy_kwargs:{n_modules: 4, module_dim: 16, encoder_sizes: [32, 32], gate_sizes: [16]}"
"""The same network as a zoo ``--hyperparams`` item."""

NEEDS_CUDA = pytest.mark.skipif(
    not th.cuda.is_available(), reason="needs a CUDA device (none is visible to torch)"
)
"""Mark of the tests that run on a GPU only (CI has none; they run where ``torch.cuda.is_available()``)."""
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]
"""``@pytest.mark.parametrize("device", DEVICES)``: a test on the CPU, and again on CUDA where there is a GPU."""


@dataclass
class CommandResult:
    """What a zoo command printed and returned (the fields of :class:`subprocess.CompletedProcess` tests read)."""

    returncode: int
    stdout: str
    stderr: str


def run_command(command: str, argv: Sequence[str]) -> CommandResult:
    """Run a zoo command (``"train"``, ``"enjoy"``, ...) in this process, as its console script does.

    Output is captured; the torch thread count that ``--num-threads`` sets is put back afterwards.
    """
    from d2r_sb3.zoo.utils import call_main

    main: Callable[[Sequence[str] | None], int | None] = importlib.import_module(
        f"d2r_sb3.zoo.{command}"
    ).main
    out, err = io.StringIO(), io.StringIO()
    threads = th.get_num_threads()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = call_main(main, list(argv))
    finally:
        th.set_num_threads(threads)
    return CommandResult(code, out.getvalue(), err.getvalue())


def check_ok(result: CommandResult) -> str:
    """The command succeeded: its stdout."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result.stdout


def check_clean_error(result: CommandResult) -> str:
    """An expected failure: exit code 2 and one ``error:`` message (an unexpected exception fails the test)."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr


NO_GRADIENT_STEP = "makes no gradient step"
"""What ``learn()`` warns when a call stays inside the warm-up (``learning_starts``): collection only."""


COLLECTION_ONLY = pytest.mark.filterwarnings(f"ignore:.*{NO_GRADIENT_STEP}")
"""For a test whose ``learn()`` raises inside the warm-up: the warning that it trains nothing is incidental."""


def collect_only(model: Any, steps: int) -> None:
    """``model.learn(steps)`` inside the warm-up, to fill the buffer: the warning that it trains nothing is expected."""
    with pytest.warns(UserWarning, match=NO_GRADIENT_STEP):
        model.learn(steps)


def tiny_d2r(env: Any = None, **kwargs: Any) -> Any:
    """A seeded D2RSAC with the :data:`TINY_D2R` network on the 4-task point-reach problem (or ``env``); short
    warm-up, small batches and buffer unless ``kwargs`` say otherwise."""
    from toy_envs import make_point_reach

    from d2r_sb3 import D2RSAC

    env = env if env is not None else make_point_reach(4)
    kwargs.setdefault("learning_starts", 200)
    kwargs.setdefault("batch_size", 64)
    kwargs.setdefault("buffer_size", 2_000)
    kwargs.setdefault("policy_kwargs", dict(TINY_D2R))
    kwargs.setdefault("seed", 0)
    return D2RSAC("D2RPolicy", env, **kwargs)
