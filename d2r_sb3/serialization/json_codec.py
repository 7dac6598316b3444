"""Plain-JSON encoding of what rebuilds a policy: its Box spaces and its constructor keyword arguments.

Nothing here names a Python object by import path: the only classes a ``policy.json`` may hold are ``torch.nn``
module classes (``{"torch.nn": "ReLU"}``), looked up in ``torch.nn`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from d2r_sb3.common.kwargs import accepted_kwargs
from d2r_sb3.common.policies import MultiTaskPolicy

__all__ = ["decode_box", "decode_kwarg", "encode_box", "encode_kwarg", "policy_kwargs"]

# Constructor arguments that only matter for training (the optimizer is rebuilt by the algorithm).
_TRAINING_ONLY_KWARGS = ("optimizer_class", "optimizer_kwargs")


def _encode_bounds(values: np.ndarray) -> list[Any]:
    # Strict JSON has no infinities: unbounded entries are written as the strings "inf" / "-inf".
    return [
        v if math.isfinite(v) else ("inf" if v > 0 else "-inf")
        for v in np.asarray(values, np.float64).ravel().tolist()
    ]


def _decode_bounds(values: list[Any], shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=dtype).reshape(shape)


def encode_box(space: spaces.Space, name: str) -> dict[str, Any]:
    """A Box space as ``{shape, low, high, dtype}`` (``name`` is for the error on any other space)."""
    if not isinstance(space, spaces.Box):
        raise ValueError(f"The {name} space must be a gymnasium Box to be saved, got {space}.")
    return {
        "shape": list(space.shape),
        "low": _encode_bounds(space.low),
        "high": _encode_bounds(space.high),
        "dtype": np.dtype(space.dtype).name,
    }


def decode_box(data: Mapping[str, Any], name: str, where: Path) -> spaces.Box:
    """The Box that :func:`encode_box` wrote (``where``: the file, for the error on a malformed entry)."""
    try:
        shape = tuple(int(n) for n in data["shape"])
        dtype = np.dtype(data["dtype"])
        low = _decode_bounds(data["low"], shape, dtype)
        high = _decode_bounds(data["high"], shape, dtype)
        return spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: {name} must be {{shape, low, high, dtype}} describing a Box ({error!r}); re-save the policy "
            "with d2r_sb3.save_policy."
        ) from error


def encode_kwarg(key: str, value: Any) -> Any:
    """A constructor argument as plain JSON (``key`` is for the error on a value JSON cannot hold)."""
    if isinstance(value, (tuple, list)):
        return [encode_kwarg(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode_kwarg(key, v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, type) and issubclass(value, th.nn.Module):
        name = value.__name__
        if getattr(th.nn, name, None) is value:
            return {"torch.nn": name}  # e.g. activation_fn=nn.ReLU, resolved on load from torch.nn only
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(
        f"Policy constructor argument {key}={value!r} cannot be written as JSON; the safe format stores plain "
        "values (numbers, strings, lists, dicts) and torch.nn classes only."
    )


def decode_kwarg(value: Any, where: Path) -> Any:
    """The value :func:`encode_kwarg` wrote; ``{"torch.nn": name}`` is looked up in ``torch.nn`` only."""
    if isinstance(value, list):
        return [decode_kwarg(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"torch.nn"}:
            cls = getattr(th.nn, str(value["torch.nn"]), None)
            if not (isinstance(cls, type) and issubclass(cls, th.nn.Module)):
                raise ValueError(f"{where}: {value['torch.nn']!r} is not a torch.nn module class.")
            return cls
        return {k: decode_kwarg(v, where) for k, v in value.items()}
    return value


def policy_kwargs(policy: MultiTaskPolicy) -> dict[str, Any]:
    """JSON-able constructor kwargs: those the class accepts, minus the spaces and the optimizer."""
    accepted = accepted_kwargs(type(policy))
    return {
        key: encode_kwarg(key, value)
        for key, value in policy._get_constructor_parameters().items()
        if key in accepted and key not in ("observation_space", "action_space", *_TRAINING_ONLY_KWARGS)
    }
