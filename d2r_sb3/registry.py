"""The trainable methods: each name ("d2r", "mtsac", ...) with its algorithm class and policy class.

:data:`METHODS` is the one list the zoo CLIs, the hub, the benchmarks and the safe loader read:

- ``zoo/train.py --algo NAME`` builds ``algorithm("PolicyClassName", env, **hyperparams)``;
- the safe policy format stores a policy by its class name and rebuilds it only from the classes listed here
  (:func:`policy_classes`, the loader's allow-list), never from an import path;
- the model card shows the method's title.

**Adding a method** is one entry here plus the module that defines its policy (and its algorithm, if it has its
own): ``"my-method": Method(MultiTaskSAC, MyPolicy, "My Method"),``. The registry then makes
``MultiTaskSAC("MyPolicy", env)`` work by adding the policy to its algorithm class's
``policy_aliases`` (SB3's name-to-class table). Python runs ``d2r_sb3/__init__.py``, which imports this module,
before any ``d2r_sb3`` submodule, so no import order can see an algorithm class without the registry's names.

Layers: this module sits above ``common/``, ``d2r/`` and ``baselines/`` (it imports their classes, they never
import it) and below :mod:`d2r_sb3.serialization` and :mod:`d2r_sb3.publishing`.
"""

from __future__ import annotations

from dataclasses import dataclass

from d2r_sb3.baselines.care import CAREPolicy
from d2r_sb3.baselines.mlp import MHSACPolicy, MTSACPolicy
from d2r_sb3.baselines.moore import MOOREPolicy
from d2r_sb3.baselines.paco import PaCoPolicy, PaCoSAC
from d2r_sb3.baselines.soft_modularization import SMPolicy
from d2r_sb3.baselines.wide import WideMHSACPolicy
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.policies import MultiTaskPolicy
from d2r_sb3.d2r.d2r import D2RSAC
from d2r_sb3.d2r.policies import D2RPolicy

__all__ = [
    "ALGOS",
    "METHODS",
    "Method",
    "algo_class",
    "method_name",
    "policy_classes",
]


@dataclass(frozen=True)
class Method:
    """One trainable method.

    :param algo_class: the algorithm (a :class:`~d2r_sb3.common.mt_sac.MultiTaskSAC`).
    :param policy_class: its policy; registered on ``algo_class.policy_aliases`` under its class name.
    :param title: the name people read (model cards, plots).
    :param also_on_core: the policy also trains with the plain :class:`MultiTaskSAC` (without what its own
        algorithm adds), so its alias is registered there too.
    """

    algo_class: type[MultiTaskSAC]
    policy_class: type[MultiTaskPolicy]
    title: str
    also_on_core: bool = False

    @property
    def policy_alias(self) -> str:
        """The string users pass as ``policy`` (``"MTSACPolicy"``), and that ``policy.json`` stores."""
        return self.policy_class.__name__


METHODS: dict[str, Method] = {
    "d2r": Method(D2RSAC, D2RPolicy, "D2R"),
    "mtsac": Method(MultiTaskSAC, MTSACPolicy, "MT-SAC"),
    "mhsac": Method(MultiTaskSAC, MHSACPolicy, "MH-SAC"),
    "sm": Method(MultiTaskSAC, SMPolicy, "Soft Modularization"),
    "mhsac-wide": Method(MultiTaskSAC, WideMHSACPolicy, "MH-SAC (width-matched)"),
    "care": Method(MultiTaskSAC, CAREPolicy, "CARE"),
    "paco": Method(
        PaCoSAC, PaCoPolicy, "PaCo", also_on_core=True
    ),  # PaCoSAC adds the reset of diverging tasks
    "moore": Method(MultiTaskSAC, MOOREPolicy, "MOORE"),
}

ALGOS: dict[str, tuple[type[MultiTaskSAC], str]] = {
    name: (method.algo_class, method.policy_alias) for name, method in METHODS.items()
}
"""``ALGOS[name] = (algorithm class, policy alias)``: the view of :data:`METHODS` the zoo CLIs unpack."""


def algo_class(name: str) -> type[MultiTaskSAC]:
    """Algorithm class of a registered method name (clear error listing the names otherwise)."""
    if name not in METHODS:
        raise ValueError(f"Unknown algo {name!r}; choose one of: {', '.join(METHODS)}.")
    return METHODS[name].algo_class


def policy_classes() -> dict[str, type[MultiTaskPolicy]]:
    """Every policy class a saved policy may name, by alias: the safe loader's allow-list.

    The methods' policies, plus what their algorithm classes list in ``policy_aliases`` (so that a policy a user
    registers there, ``MultiTaskSAC.policy_aliases["MyPolicy"] = MyPolicy``, saves and loads too).
    """
    known: dict[str, type[MultiTaskPolicy]] = {}
    for method in METHODS.values():
        known.update(method.algo_class.policy_aliases)  # type: ignore[arg-type]
    known.update({method.policy_alias: method.policy_class for method in METHODS.values()})
    return known


def method_name(policy_class: type, algo: type | None = None) -> str | None:
    """The registered name of the method with this policy class (and algorithm class, when given), if any."""
    for name, method in METHODS.items():
        if method.policy_class is policy_class and (algo is None or algo is method.algo_class):
            return name
    return None


def _register_policy_aliases() -> None:
    """Add each method's policy to its algorithm class's ``policy_aliases``, so a string names it."""
    # Base classes first, so that a subclass's own table (a copy) starts from all of its parent's names.
    for method in sorted(METHODS.values(), key=lambda method: len(method.algo_class.__mro__)):
        classes = [method.algo_class] + ([MultiTaskSAC] if method.also_on_core else [])
        for cls in classes:
            if "policy_aliases" not in vars(
                cls
            ):  # its own table: a subclass must not add names to its parent's
                cls.policy_aliases = dict(cls.policy_aliases)
            cls.policy_aliases[method.policy_alias] = method.policy_class


_register_policy_aliases()
