"""Words for the env a run was trained on, from its :func:`~d2r_sb3.make_mt_env` keyword arguments."""

from __future__ import annotations

from typing import Any

__all__ = ["benchmark_label", "protocol", "zoo_env_name"]


def benchmark_label(env_kwargs: dict[str, Any]) -> str:
    """``"MT10"`` or ``"MT50"`` (as given), or ``"custom"`` for a task list."""
    benchmark = env_kwargs.get("benchmark", "custom")
    return benchmark if isinstance(benchmark, str) and benchmark.upper() in ("MT10", "MT50") else "custom"


def zoo_env_name(env_kwargs: dict[str, Any]) -> str:
    """Zoo env name from make_mt_env kwargs (``MT10-rand``, ``MT10-rand-mw3``, ``custom-fixed``)."""
    name = f"{benchmark_label(env_kwargs)}-{env_kwargs.get('goals', 'rand')}"
    preset = env_kwargs.get("preset", "paper")
    return name if preset == "paper" else f"{name}-{preset}"


def protocol(env_kwargs: dict[str, Any]) -> str:
    """One line describing the episode protocol of make_mt_env kwargs (for the card and results.json)."""
    parts = [f"preset `{env_kwargs.get('preset', 'paper')}`", f"goals `{env_kwargs.get('goals', 'rand')}`"]
    if env_kwargs.get("max_episode_steps"):
        parts.append(f"{env_kwargs['max_episode_steps']}-step episodes")
    if env_kwargs.get("time_limit_terminal") is not None:
        parts.append(
            "time limit = terminal" if env_kwargs["time_limit_terminal"] else "time limit = truncation"
        )
    if env_kwargs.get("reward_scale") is not None:
        parts.append(f"reward x {env_kwargs['reward_scale']}")
    if env_kwargs.get("reward_function_version"):
        parts.append(f"reward {env_kwargs['reward_function_version']}")
    return ", ".join(parts)
