"""The method registry: names to algorithm and policy classes, the policy aliases, the safe loader's allow-list."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.registry import ALGOS, METHODS, algo_class, method_name, policy_classes

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_names_its_classes_and_its_alias_resolves():
    for name, method in METHODS.items():
        assert ALGOS[name] == (method.algo_class, method.policy_class.__name__)
        assert algo_class(name) is method.algo_class
        assert method.algo_class.policy_aliases[method.policy_alias] is method.policy_class
        assert policy_classes()[method.policy_alias] is method.policy_class
        assert method_name(method.policy_class, method.algo_class) == name


def test_a_string_policy_works_whatever_was_imported_first():
    """Importing only the core class (not d2r_sb3.baselines) is enough: d2r_sb3/__init__ imports the registry."""
    code = (
        "from d2r_sb3.common.mt_sac import MultiTaskSAC\n"
        "from d2r_sb3.baselines.mlp import MTSACPolicy\n"
        "assert MultiTaskSAC.policy_aliases['MTSACPolicy'] is MTSACPolicy, MultiTaskSAC.policy_aliases\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_baselines_register_nothing_on_import():
    for path in sorted((ROOT / "d2r_sb3" / "baselines").glob("*.py")):
        tree = ast.parse(path.read_text())
        touched = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "policy_aliases"
        ]
        assert not touched, (
            f"{path.name}:{touched} changes policy_aliases; register methods in d2r_sb3.registry"
        )


def test_a_user_registered_policy_is_allowed(monkeypatch):
    class MyPolicy:
        pass

    monkeypatch.setitem(MultiTaskSAC.policy_aliases, "MyPolicy", MyPolicy)
    assert policy_classes()["MyPolicy"] is MyPolicy
    assert method_name(MyPolicy) is None
