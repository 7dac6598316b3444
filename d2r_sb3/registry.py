"""Names of the trainable methods, shared by the zoo CLIs, the hub and the benchmarks.

``ALGOS[name] = (algorithm class, policy alias)``: ``zoo/train.py --algo NAME`` builds
``cls(alias, env, **hyperparams)``. Baseline policies register their aliases in
``MultiTaskSAC.policy_aliases`` when :mod:`d2r_sb3.baselines` is imported.
"""

from __future__ import annotations

from d2r_sb3.baselines.paco import PaCoSAC
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.d2r.d2r import D2RSAC

ALGOS: dict[str, tuple[type[MultiTaskSAC], str]] = {
    "d2r": (D2RSAC, "D2RPolicy"),
    "mtsac": (MultiTaskSAC, "MTSACPolicy"),
    "mhsac": (MultiTaskSAC, "MHSACPolicy"),
    "sm": (MultiTaskSAC, "SMPolicy"),
    "mhsac-wide": (MultiTaskSAC, "WideMHSACPolicy"),
    "care": (MultiTaskSAC, "CAREPolicy"),
    "paco": (PaCoSAC, "PaCoPolicy"),
    "moore": (MultiTaskSAC, "MOOREPolicy"),
}


def algo_class(name: str) -> type[MultiTaskSAC]:
    """Algorithm class of a registered method name (clear error listing the names otherwise)."""
    if name not in ALGOS:
        raise ValueError(f"Unknown algo {name!r}; choose one of: {', '.join(ALGOS)}.")
    return ALGOS[name][0]
