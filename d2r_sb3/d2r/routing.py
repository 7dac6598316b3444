"""Routing graphs, route selection and routing paths for D2R.

Vocabulary (D2R_SPEC.md sections 1-2):

* A **node** is either one of the ``n`` routed modules or the routed **output node** (index ``n``).
* The **routing graph** says, for every node, which earlier modules it may read from (its *candidates*).
  A node with no candidates is an *input node*: it reads the state encoding directly (module 1 in D2R).
* The **gate logits** ``z`` hold one logit per candidate edge, row by row. For D2R's module-level graph with
  16 modules this gives chunks of 1, 2, ..., 16 logits (136 in total), exactly the authors' layout.
* A **route** picks up to ``k`` sources per node: ``sources[..., node, slot]`` holds module indices and
  ``slot_valid[node, slot]`` says which slots are used (module 2 has a single candidate, so one slot is empty).
* **MaskSoftmax** (paper Eq. 5; Eq. 8 with stored routes): the routing weights are the softmax of the *un-tempered* logits restricted to
  the chosen sources. The temperature only changes which sources are drawn.
* The **ResRouting mask** ``keep`` (paper Eq. 10) marks chosen sources whose full-softmax share exceeds
  ``1 / (number of candidates + 1)``; the others only pass gradient through the residual shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch as th

RoutingFunction = Literal["topk", "hard", "soft"]
RoutingLevel = Literal["module", "layer", "model"]
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


class RoutingGraph:
    """Static description of a routing graph plus the index tensors the batched code needs.

    Everything here is constant per network, computed once: which nodes are input nodes, where each gate
    logit goes in the padded ``[n + 1, n]`` matrix, and which route slots are used.
    """

    def __init__(self, n_modules: int, top_k: int, routing: str, level: str = "module", n_layers: int = 4):
        if routing not in ROUTING_FUNCTIONS:
            raise ValueError(f"Unknown routing function {routing!r}; choose one of {ROUTING_FUNCTIONS}.")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        self.n_modules = n_modules
        self.routing = routing
        self.candidates = build_candidates(n_modules, level, n_layers)  # [n+1, n]
        self.n_candidates = self.candidates.sum(-1)  # [n+1]
        if int(self.n_candidates[n_modules]) == 0:
            raise ValueError("the output node has no candidate sources")
        self.input_nodes = [i for i in range(n_modules) if int(self.n_candidates[i]) == 0]
        self.routed_nodes = [i for i in range(n_modules + 1) if int(self.n_candidates[i]) > 0]
        self.num_logits = int(self.n_candidates.sum())
        # Sources per node: k for Top-K, 1 for hard routing, every candidate for soft routing.
        if routing == "topk":
            self.slots = top_k
        elif routing == "hard":
            self.slots = 1
        else:
            self.slots = int(self.n_candidates.max())
        # Position of each candidate edge in the flat logit vector (row-major over the candidate matrix).
        flat_index = th.full((n_modules + 1, n_modules), -1, dtype=th.long)
        flat_index[self.candidates] = th.arange(self.num_logits)
        self.flat_index = flat_index
        used = th.minimum(self.n_candidates, th.tensor(self.slots))  # sources actually used per node
        self.slot_valid = th.arange(self.slots)[None, :] < used[:, None]  # [n+1, slots]
        # ResRouting threshold 1 / (candidates + 1) per node (strict '>', spec section 2.2).
        self.keep_threshold = 1.0 / (self.n_candidates.to(th.float32) + 1.0)
        self._unused_slot_fill = th.where(self.n_candidates[:, None] > 0, float("-inf"), 0.0).expand(
            n_modules + 1, self.slots
        )
        # Stored routes: only nodes that route (input nodes have nothing to store).
        self.route_shape = (len(self.routed_nodes), self.slots)

    # ----------------------------------------------------------------------------------------------------
    def padded_logits(self, logits: th.Tensor) -> th.Tensor:
        """Flat gate logits ``[..., L]`` -> ``[..., n + 1, n]`` with ``-inf`` off the candidate set.

        Input-node rows are filled with zeros instead of ``-inf`` so that a softmax over them is finite; their
        route slots are marked invalid, so nothing downstream uses them.
        """
        index = self.flat_index.clamp(min=0)
        padded = logits[..., index]
        fill = th.where(self.n_candidates[:, None] > 0, float("-inf"), 0.0).expand_as(self.candidates)
        return th.where(self.candidates, padded, fill.to(logits.dtype))

    def select(self, padded: th.Tensor, temperature: th.Tensor | None, explore: bool) -> th.Tensor:
        """Pick the sources of every node.

        :param padded: ``[..., n + 1, n]`` padded logits.
        :param temperature: per-sample temperature broadcastable to ``padded[..., 0, 0]`` (SampleK only).
        :param explore: ``True`` draws ``k`` sources without replacement from ``softmax(z / tau)`` (SampleK),
            ``False`` takes the top ``k`` (TopK).
        :return: long tensor ``[..., n + 1, slots]`` of module indices (unused slots hold 0).
        """
        valid = self.slot_valid.to(padded.device)
        if self.routing == "soft":
            shape = (*padded.shape[:-1], self.slots)
            sources = th.arange(self.slots, device=padded.device).expand(shape)
        else:
            with th.no_grad():
                scores = padded
                if explore:
                    # Gumbel-top-k: the top k of (z / tau + Gumbel noise) is an exact draw of k items without
                    # replacement from softmax(z / tau), done for every node and sample at once.
                    tau = temperature[..., None, None] if temperature is not None else 1.0
                    uniform = th.rand_like(padded).clamp_(min=1e-20)
                    scores = padded / tau - th.log(-th.log(uniform))
                sources = scores.topk(self.slots, dim=-1).indices
        # Unused slots point at module 0, which every routed node may read (it is computed first), so that
        # no gather touches a module that is not computed yet; their weight is 0.
        return th.where(valid, sources, 0)

    def weights(self, padded: th.Tensor, sources: th.Tensor) -> th.Tensor:
        """Routing weights of the chosen sources, ``[..., n + 1, slots]`` (zero on invalid slots).

        Top-K uses MaskSoftmax (softmax of the un-tempered logits over the chosen sources, Eq. 5); hard routing
        keeps the full-softmax probability of its single source so the gate still learns (Switch-Transformer
        style); soft routing uses the full softmax over every candidate.
        """
        valid = self.slot_valid.to(padded.device)
        if self.routing == "topk":
            # Unused slots get -inf, except on input-node rows (no slot used), which get 0 to stay finite.
            chosen = th.where(valid, padded.gather(-1, sources), self._unused_slot_fill.to(padded))
            probs = th.softmax(chosen, dim=-1)
        else:
            probs = th.softmax(padded, dim=-1).gather(-1, sources)
        return probs * valid

    def keep_mask(self, padded: th.Tensor, sources: th.Tensor) -> th.Tensor:
        """ResRouting mask: a chosen source is kept iff its full-softmax share > 1 / (candidates + 1)."""
        with th.no_grad():
            share = th.softmax(padded, dim=-1).gather(-1, sources)
            return share > self.keep_threshold.to(padded.device)[:, None]

    # ----------------------------------------------------------------------------------------------------
    def encode(self, sources: th.Tensor) -> th.Tensor:
        """Compact storable route: ``uint8 [..., routed nodes, slots]`` (32 bytes for default D2R)."""
        routed = sources[..., self.routed_nodes, :]
        valid = self.slot_valid[self.routed_nodes].to(sources.device)
        return th.where(valid, routed, 0).to(th.uint8)

    def decode(self, route: th.Tensor) -> th.Tensor:
        """Inverse of :meth:`encode`: ``uint8 [..., routed nodes, slots]`` -> long ``[..., n + 1, slots]``."""
        shape = (*route.shape[:-2], self.n_modules + 1, self.slots)
        sources = th.zeros(shape, dtype=th.long, device=route.device)
        sources[..., self.routed_nodes, :] = route.long()
        return sources

    def path(self, padded: th.Tensor, sources: th.Tensor) -> RoutingPath:
        """Build a :class:`RoutingPath` (edges, logits, active modules) from chosen sources."""
        n = self.n_modules
        valid = self.slot_valid.to(sources.device)
        one_hot = th.nn.functional.one_hot(sources, n).bool() & valid[..., None]
        edges = one_hot.any(dim=-2)  # [..., n + 1, n]
        logits = padded.masked_fill(~self.candidates.to(padded.device), float("-inf"))
        active = edges[..., n, :].clone()
        for node in range(n - 1, -1, -1):
            active |= edges[..., node, :] & active[..., node : node + 1]
        return RoutingPath(edges=edges, logits=logits, active=active, num_active=active.sum(-1))
