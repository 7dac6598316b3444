"""Routing graphs, route selection and routing paths for D2R.

Vocabulary (paper Eqs. 4-8 and 10; :mod:`d2r_sb3.d2r.reference` states each of them plainly):

* A **node** is either one of the ``n`` routed modules or the routed **output node** (index ``n``).
* The **routing graph** says, for every node, which earlier modules it may read from (its *candidates*).
  A node with no candidates is an *input node*: it reads the state encoding directly (module 1 in D2R).
* The **gate logits** ``z`` hold one logit per candidate edge, row by row. For D2R's module-level graph with
  16 modules this gives chunks of 1, 2, ..., 16 logits (136 in total), exactly the authors' layout.
* A **route** picks up to ``k`` sources per node: ``sources[..., node, slot]`` holds module indices and
  ``slot_valid[node, slot]`` says which slots are used (module 2 has a single candidate, so one slot is empty).
* **TopK** (Eq. 6) takes the ``k`` largest logits of a node; **SampleK** (Eqs. 7 and 13) draws ``k`` sources without
  replacement from the softmax of the logits divided by the task's routing temperature.
* **MaskSoftmax** (Eq. 5; Eq. 8 with stored routes): the routing weights are the softmax of the *un-tempered*
  logits restricted to the chosen sources (:meth:`RoutedNetwork.mask_softmax
  <d2r_sb3.d2r.network.RoutedNetwork.mask_softmax>`). The temperature only changes which sources are drawn.
* The **ResRouting mask** ``keep`` (paper Eq. 10) marks chosen sources whose full-softmax share exceeds
  ``1 / (number of candidates + 1)``; the others only pass gradient through the residual shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch as th
from torch import nn

from d2r_sb3.d2r import compiled

ROUTING_FUNCTIONS: tuple[str, ...] = ("topk", "hard", "soft")
ROUTING_LEVELS: tuple[str, ...] = ("module", "layer", "model")


def build_candidates(n_modules: int, level: str = "module", n_layers: int = 4) -> th.Tensor:
    """Candidate-edge matrix of a routing graph.

    :param n_modules: number of routed modules ``n``.
    :param level: ``"module"`` (D2R: every module may read any earlier module, a DAG over single modules),
        ``"layer"`` (modules grouped in ``n_layers`` layers of ``n / n_layers``; a module reads only the
        previous layer, the output reads the last layer) or ``"model"`` (``n / n_layers`` parallel chains of
        ``n_layers`` modules, mixed only at the output node). These are the three levels of the paper's Fig. 7(d).
    :param n_layers: layers (``"layer"``) or chain length (``"model"``).
    :return: bool tensor ``[n + 1, n]``; row ``i`` lists the modules node ``i`` may read (row ``n`` is the
        output node).
    """
    if level not in ROUTING_LEVELS:
        raise ValueError(f"Unknown routing level {level!r}; choose one of {ROUTING_LEVELS}.")
    cand = th.zeros(n_modules + 1, n_modules, dtype=th.bool)
    if level == "module":
        for i in range(1, n_modules + 1):
            cand[i, :i] = True
        return cand
    if n_layers < 1 or n_modules % n_layers != 0:
        raise ValueError(
            f"routing level {level!r} needs n_modules ({n_modules}) divisible by n_layers ({n_layers})."
        )
    if level == "layer":
        width = n_modules // n_layers
        for layer in range(1, n_layers):
            rows = slice(layer * width, (layer + 1) * width)
            cand[rows, (layer - 1) * width : layer * width] = True
        cand[n_modules, (n_layers - 1) * width :] = True
        return cand
    # "model": chains of n_layers consecutive modules; the output mixes the chain ends.
    n_chains = n_modules // n_layers
    for chain in range(n_chains):
        first = chain * n_layers
        for depth in range(1, n_layers):
            cand[first + depth, first + depth - 1] = True
        cand[n_modules, first + n_layers - 1] = True
    return cand


def _host_floats(values: th.Tensor) -> np.ndarray:
    """``values`` on the host as a contiguous float32 or float64 array (numpy has no bfloat16): one compiled
    version of a loop per dtype."""
    values = values if values.dtype in (th.float32, th.float64) else values.double()
    return np.ascontiguousarray(values.numpy())


@dataclass
class RoutingPath:
    """A routing path in the layout the paper's Figs. 6 and 8 count.

    ``edges[b, i, j]`` (bool, ``[batch, n + 1, n]``): row ``i < n`` lists the source modules of module ``i + 1``
    (row 0 is empty for D2R: module 1 reads the state encoding), row ``n`` lists the sources of the output node.
    ``logits``: the gate logits in the same layout, ``-inf`` where an edge is not a candidate.
    ``active`` (bool ``[batch, n]``): modules reachable backward from the output node along the chosen edges.
    ``num_active``: ``active.sum(-1)``.
    """

    edges: th.Tensor
    logits: th.Tensor
    active: th.Tensor
    num_active: th.Tensor

    def to(self, device: th.device | str) -> RoutingPath:
        return RoutingPath(*(t.to(device) for t in (self.edges, self.logits, self.active, self.num_active)))


class RoutingGraph(nn.Module):
    """Static description of a routing graph plus the index tables the batched code needs.

    Everything here is constant per network, computed once: which nodes are input nodes, where each gate
    logit goes in the padded ``[n + 1, n]`` matrix, and which route slots are used. The tables are
    non-persistent buffers: they follow the network's ``.to(device)`` (no host-to-device copy per call, which
    would synchronise a GPU) and stay out of its ``state_dict``.
    """

    candidates: th.Tensor
    n_candidates: th.Tensor
    flat_index: th.Tensor
    slot_valid: th.Tensor
    keep_threshold: th.Tensor
    routed_index: th.Tensor
    pad_index: th.Tensor
    pad_fill: th.Tensor
    candidate_position: th.Tensor
    edge_position: th.Tensor

    def __init__(self, n_modules: int, top_k: int, routing: str, level: str = "module", n_layers: int = 4):
        super().__init__()
        if routing not in ROUTING_FUNCTIONS:
            raise ValueError(f"Unknown routing function {routing!r}; choose one of {ROUTING_FUNCTIONS}.")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        self.n_modules = n_modules
        self.routing = routing
        candidates = build_candidates(n_modules, level, n_layers)  # [n+1, n]
        n_candidates = candidates.sum(-1)  # [n+1]
        if int(n_candidates[n_modules]) == 0:
            raise ValueError("the output node has no candidate sources")
        self.input_nodes = [i for i in range(n_modules) if int(n_candidates[i]) == 0]
        self.routed_nodes = [i for i in range(n_modules + 1) if int(n_candidates[i]) > 0]
        self.num_logits = int(n_candidates.sum())
        # Sources per node: k for Top-K, 1 for hard routing, every candidate for soft routing.
        if routing == "topk":
            self.slots = top_k
        elif routing == "hard":
            self.slots = 1
        else:
            self.slots = int(n_candidates.max())
        # Position of each candidate edge in the flat logit vector (row-major over the candidate matrix).
        flat_index = th.full((n_modules + 1, n_modules), -1, dtype=th.long)
        flat_index[candidates] = th.arange(self.num_logits)
        used = th.minimum(n_candidates, th.tensor(self.slots))  # sources actually used per node
        routes = n_candidates > 0
        # Padded logits are one gather from [logits, -inf, 0]: off-candidate entries read the -inf column, rows
        # of input nodes the 0 column (finite, so a softmax over them stays finite; their slots are unused).
        pad_index = flat_index.clone()
        pad_index[~candidates] = self.num_logits
        pad_index[~routes] = self.num_logits + 1
        tables = {
            "candidates": candidates,
            "n_candidates": n_candidates,
            "flat_index": flat_index,
            "slot_valid": th.arange(self.slots)[None, :] < used[:, None],  # [n+1, slots]
            # ResRouting threshold 1 / (candidates + 1) per node: the paper's 1/i for module i (Eq. 10), with the
            # strict '>' of the authors' code where the paper writes '>='.
            "keep_threshold": 1.0 / (n_candidates.to(th.float32) + 1.0),
            "routed_index": th.tensor(self.routed_nodes),
            "pad_index": pad_index.flatten(),
            "pad_fill": th.tensor([float("-inf"), 0.0]),
            # Where each flat logit sits in the flattened padded matrix (the inverse of pad_index).
            "candidate_position": th.nonzero(candidates.flatten()).flatten(),
            # Flat logit position of edge (node, module), [n + 1, n]; 0 off the candidates (unused slots).
            "edge_position": flat_index.clamp(min=0),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.clone(), persistent=False)
        # Stored routes: only nodes that route (input nodes have nothing to store).
        self.route_shape = (len(self.routed_nodes), self.slots)
        # The same tables as Python lists, for the per-observation code of compute skipping: sources used per
        # node (slots fill from 0) and, per node, its candidate modules with their flat logit positions.
        self.slots_used: list[int] = used.tolist()
        self.candidate_lists: list[tuple[list[int], list[int]]] = [
            (th.nonzero(candidates[node]).flatten().tolist(), flat_index[node][candidates[node]].tolist())
            for node in range(n_modules + 1)
        ]
        # The host tables of the compiled TopK choice (compiled.top_routes): each node's run of flat logits (in
        # module order, row-major) and the module of every flat logit.
        module_of = np.zeros(self.num_logits, dtype=np.int64)
        for modules, positions in self.candidate_lists:
            module_of[positions] = modules
        self.slots_used_host = used.numpy().astype(np.int64)
        self._host_tables = (
            np.array(
                [positions[0] if positions else 0 for _, positions in self.candidate_lists], dtype=np.int64
            ),
            n_candidates.numpy().astype(np.int64),
            module_of,
            flat_index.numpy(),
            tables["keep_threshold"].numpy().astype(np.float64),
        )

    # ----------------------------------------------------------------------------------------------------
    def padded_logits(self, logits: th.Tensor) -> th.Tensor:
        """Flat gate logits ``[..., L]`` -> ``[..., n + 1, n]`` with ``-inf`` off the candidate set.

        Input-node rows are filled with zeros instead of ``-inf`` so that a softmax over them is finite; their
        route slots are marked invalid, so nothing downstream uses them.
        """
        lead = logits.shape[:-1]
        extended = th.cat([logits, self.pad_fill.to(logits.dtype).expand(*lead, 2)], dim=-1)
        padded = extended.gather(-1, self.pad_index.expand(*lead, -1))
        return padded.view(*lead, self.n_modules + 1, self.n_modules)

    @th.no_grad()
    def select(
        self, padded: th.Tensor, temperature: th.Tensor | None, explore: bool, logits: th.Tensor | None = None
    ) -> th.Tensor:
        """Pick the sources of every node.

        :param padded: ``[..., n + 1, n]`` padded logits.
        :param temperature: per-sample temperature broadcastable to ``padded[..., 0, 0]`` (SampleK only).
        :param explore: ``True`` draws ``k`` sources without replacement from ``softmax(z / tau)`` (SampleK,
            Eqs. 7 and 13), ``False`` takes the top ``k`` (TopK, Eq. 6).
        :param logits: the flat logits ``[..., L]`` behind ``padded``, if at hand (else they are read back out of
            ``padded``): SampleK draws noise for the candidate edges only (half of the padded entries for D2R's
            graph).
        :return: long tensor ``[..., n + 1, slots]`` of module indices (unused slots hold 0).
        """
        if self.routing == "soft":
            sources = th.arange(self.slots, device=padded.device).expand(*padded.shape[:-1], self.slots)
            return th.where(self.slot_valid, sources, 0)
        if not explore:
            return self._top(padded)
        if logits is None:
            logits = padded.flatten(-2).index_select(-1, self.candidate_position)
        return self._top(self.padded_logits(self._perturbed(logits, temperature)))

    def _top(self, scores: th.Tensor) -> th.Tensor:
        """The ``slots`` best of every node's padded ``scores [..., n + 1, n]``; unused slots point at module 0,
        which every routed node may read (it is computed first), so that no gather touches a module that is not
        computed yet (their weight is 0)."""
        if self.slots <= 2:
            # One or two max passes: several times faster than topk on rows of 16, and ties go to the lower
            # module (topk breaks them in no set order).
            first = scores.max(dim=-1, keepdim=True).indices
            if self.slots == 1:
                return th.where(self.slot_valid, first, 0)
            second = scores.scatter(-1, first, float("-inf")).max(dim=-1, keepdim=True).indices
            sources = th.cat([first, second], dim=-1)
        else:
            sources = scores.topk(self.slots, dim=-1).indices
        return th.where(self.slot_valid, sources, 0)

    @staticmethod
    def _perturbed(logits: th.Tensor, temperature: th.Tensor | None) -> th.Tensor:
        """SampleK's scores ``z / tau + Gumbel noise`` of flat logits ``[..., L]``: their top ``k`` are an exact
        draw of ``k`` items without replacement from ``softmax(z / tau)`` (Gumbel-top-k)."""
        tau = temperature[..., None] if temperature is not None else 1.0
        gumbel = th.rand_like(logits).clamp_(min=1e-20).log_().neg_().log_()
        return (logits / tau).sub_(gumbel)

    @th.no_grad()
    def top_routes(
        self,
        logits: th.Tensor,
        temperature: th.Tensor | None,
        explore: bool,
        given: th.Tensor | None = None,
        resrouting: bool = False,
        compiled_loop: bool | None = None,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Top-k route choice from flat logits: ``(sources, positions, keep)``, each ``[E, B, n + 1, slots]``.

        ``sources`` are those of :meth:`select` (or ``given``, decoded stored routes ``[E or 1, B, n + 1,
        slots]``), ``positions`` the flat positions of their logits (0 where a source is not a candidate: unused
        slots) and ``keep`` the ResRouting masks of :meth:`keep_mask` (``None`` unless ``resrouting``). With
        ``compiled_loop`` (``None``: on a CPU) this is one compiled pass over the logits on the host
        (:func:`~d2r_sb3.d2r.compiled.top_routes`, on torch's threads; the ResRouting shares in float64) instead
        of a dozen tensor operations on the padded logits; otherwise it is those operations (no host sync, what
        GPUs need). Same routes either way: SampleK draws the same noise.
        """
        scores = self._perturbed(logits, temperature) if explore and given is None else None
        if compiled_loop is None:
            compiled_loop = logits.device.type == "cpu"
        if compiled_loop:
            z = _host_floats(logits)
            chosen, positions, keep = compiled.top_routes(
                z,
                _host_floats(scores) if scores is not None else np.zeros((0, 0, 0), dtype=z.dtype),
                np.ascontiguousarray(given.numpy())
                if given is not None
                else np.zeros((0, 0, 0, 0), dtype=np.int64),
                *self._host_tables,
                self.slots,
                resrouting,
                compiled.loop_threads(th.get_num_threads()),
            )
            return (
                th.from_numpy(chosen),
                th.from_numpy(positions),
                th.from_numpy(keep) if resrouting else None,
            )
        padded = self.padded_logits(logits)
        if given is None:
            given = self._top(padded if scores is None else self.padded_logits(scores))
        sources = given.expand(*logits.shape[:-1], *given.shape[-2:])
        positions = self.edge_position.expand(*sources.shape[:-2], *self.edge_position.shape).gather(
            -1, sources
        )
        return sources, positions, self.keep_mask(padded, sources) if resrouting else None

    def keep_mask(self, padded: th.Tensor, sources: th.Tensor) -> th.Tensor:
        """ResRouting mask (Eq. 10): a chosen source is kept iff its full-softmax share > 1 / (candidates + 1)."""
        with th.no_grad():
            share = th.softmax(padded, dim=-1).gather(-1, sources)
            return share > self.keep_threshold[:, None]

    # ----------------------------------------------------------------------------------------------------
    def encode(self, sources: th.Tensor) -> th.Tensor:
        """Compact storable route: ``uint8 [..., routed nodes, slots]`` (32 bytes for default D2R)."""
        routed = sources.index_select(-2, self.routed_index)
        valid = self.slot_valid.index_select(0, self.routed_index)
        return th.where(valid, routed, 0).to(th.uint8)

    def decode(self, route: th.Tensor) -> th.Tensor:
        """Inverse of :meth:`encode`: ``uint8 [..., routed nodes, slots]`` -> long ``[..., n + 1, slots]``."""
        shape = (*route.shape[:-2], self.n_modules + 1, self.slots)
        sources = th.zeros(shape, dtype=th.long, device=route.device)
        return sources.index_copy_(-2, self.routed_index, route.long())

    def path(self, padded: th.Tensor, sources: th.Tensor) -> RoutingPath:
        """Build a :class:`RoutingPath` (edges, logits, active modules) from chosen sources."""
        n = self.n_modules
        valid = self.slot_valid
        one_hot = th.nn.functional.one_hot(sources, n).bool() & valid[..., None]
        edges = one_hot.any(dim=-2)  # [..., n + 1, n]
        logits = padded.masked_fill(~self.candidates, float("-inf"))
        active = edges[..., n, :].clone()
        for node in range(n - 1, -1, -1):
            active |= edges[..., node, :] & active[..., node : node + 1]
        return RoutingPath(edges=edges, logits=logits, active=active, num_active=active.sum(-1))
