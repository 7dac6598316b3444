"""Torch's fused Adam for the multi-task SAC optimizers.

One fused kernel updates all of an optimizer's parameters (CPU and CUDA), where the default for-each-parameter
Adam launches several small operators per parameter tensor: on a CPU at batch 320 that is ~5 ms of a ~180 ms
D2R gradient step. Same update rule; the values differ only by float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch as th

__all__ = ["FUSED_DEVICES", "fused_kwargs", "restore_fused"]

FUSED_DEVICES = ("cpu", "cuda")
_FUSABLE = (th.optim.Adam, th.optim.AdamW)


def _wants_fused(optimizer_class: type, kwargs: dict[str, Any]) -> bool:
    """Fuse torch's Adam/AdamW unless the caller said ``fused`` (``fused=False`` keeps torch's default) or
    ``foreach=False``. ``foreach=True``, D2R's earlier default (saved in older models), counts as no choice."""
    return optimizer_class in _FUSABLE and "fused" not in kwargs and kwargs.get("foreach", True) is not False


def fused_kwargs(
    optimizer_class: type, kwargs: dict[str, Any], params: Iterable[th.Tensor]
) -> dict[str, Any]:
    """``kwargs`` with ``fused=True`` added where it applies: torch's Adam or AdamW, no implementation chosen
    by the caller, and floating-point parameters on a device with a fused kernel."""
    if _wants_fused(optimizer_class, kwargs) and all(
        p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params
    ):
        return {**{k: v for k, v in kwargs.items() if k != "foreach"}, "fused": True}
    return kwargs


def restore_fused(optimizer: th.optim.Optimizer, kwargs: dict[str, Any]) -> None:
    """Fuse ``optimizer`` again after ``load_state_dict``, which overwrites the param groups' ``fused`` flag
    with the saved one (``None`` in optimizers saved before fusing was the default)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if fused_kwargs(type(optimizer), kwargs, params).get("fused"):
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, None
