"""Where the package adds rows into shared places, the order of the additions is fixed on every device.

On a GPU the scattering adds (``index_add_``, ``scatter_add_``, ``index_put_(accumulate=True)``, ``bincount``, ...)
run as atomics in whatever order threads arrive: where several rows meet in one place, two identical training steps
differ in the last bits (this happened once: a CPU speed change made the task lookup's weight gradient an
``index_add_`` of the whole batch, and no test without a GPU could see it). This test reads the package's source
and lists every call of such an operator on tensors; each must be one of the uses below, with the reason its sums
are reproducible. A new use fails here until it is added with its reason (or routed through
:func:`d2r_sb3.common.index_sums.sum_by_index`). Numpy's (host-side) calls are not tensors' and are left out.
"""

from __future__ import annotations

import ast

from test_import_layers import module_files

SCATTERING = {
    "index_add",
    "index_add_",
    "scatter_add",
    "scatter_add_",
    "scatter_reduce",
    "scatter_reduce_",
    "index_put",
    "index_put_",
    "put_",
    "index_reduce",
    "index_reduce_",
    "index_copy",
    "index_copy_",
    "bincount",
    "histc",
}
"""Tensor operators whose CUDA kernels let several rows meet in one place in no fixed order."""

KNOWN_USES = {
    ("d2r_sb3.common.index_sums", "sum_by_index", "index_add_"): (
        "on a CPU only; other devices take a fixed-order sum"
    ),
    ("d2r_sb3.d2r.routing", "decode", "index_copy_"): ("the routed nodes' rows: distinct indices"),
    ("d2r_sb3.d2r.block_edges", "push", "index_add_"): (
        "one call per node: each of its rows reads rows of its own sample, so rows of two samples never meet (an "
        "unused slot repeats a source of its row with weight 0 and adds an exact 0)"
    ),
    ("d2r_sb3.d2r.block_operators", "_input_module_backward", "index_add_"): (
        "one row per sample: distinct indices (padding rows add an exact 0)"
    ),
    ("d2r_sb3.d2r.block_operators", "routing_weight_gradient", "index_copy_"): (
        "distinct grid rows, except padding rows, which all write 0 to one spare row that is dropped"
    ),
}
"""Each known call, with the reason its result does not depend on the order of the GPU's threads."""


class _Calls(ast.NodeVisitor):
    """Collects the scattering calls of one module, each under its innermost enclosing function."""

    def __init__(self, module: str):
        self.module, self.functions, self.found = module, ["<module>"], set()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Attribute) and node.func.attr in SCATTERING:
            owner = node.func.value
            if not (isinstance(owner, ast.Name) and owner.id == "np"):
                self.found.add((self.module, self.functions[-1], node.func.attr))
        self.generic_visit(node)


def scattering_calls() -> set[tuple[str, str, str]]:
    """``(module, innermost enclosing function, operator)`` of every call of a :data:`SCATTERING` operator on a
    tensor."""
    found: set[tuple[str, str, str]] = set()
    for module, path in module_files().items():
        calls = _Calls(module)
        calls.visit(ast.parse(path.read_text(), filename=str(path)))
        found |= calls.found
    return found


def test_every_scattering_add_on_tensors_is_a_known_reproducible_use():
    found = scattering_calls()
    unknown = sorted(found - KNOWN_USES.keys())
    assert not unknown, (
        f"New scattering calls {unknown}: on a GPU they add in no fixed order where indices repeat. Use "
        "d2r_sb3.common.index_sums.sum_by_index, or add the call to KNOWN_USES with the reason it is reproducible."
    )
    stale = sorted(KNOWN_USES.keys() - found)
    assert not stale, f"KNOWN_USES lists calls the package no longer makes: {stale}"


def test_the_scan_finds_tensor_calls_and_skips_numpy(tmp_path, monkeypatch):
    """The reader itself: a tensor method (under its innermost function) and a ``th.`` function are found,
    ``np.bincount`` is not."""
    import test_scatter_sums

    package = tmp_path / "d2r_sb3"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sums.py").write_text(
        "def f(x, i, v):\n    def g():\n        return x.index_add_(0, i, v)\n    return g(), th.bincount(i), np.bincount(i)\n"
    )
    monkeypatch.setattr(test_scatter_sums, "module_files", lambda: {"d2r_sb3.sums": package / "sums.py"})
    assert test_scatter_sums.scattering_calls() == {
        ("d2r_sb3.sums", "g", "index_add_"),
        ("d2r_sb3.sums", "f", "bincount"),
    }
