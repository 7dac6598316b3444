"""The D2R network, shared by the actor and the critics (paper Eqs. 3-8 and Fig. 3).

``x = [state part, task one-hot]``  (the critic's state part is ``[s, a]``)

* state encoder **F**: ``Linear -> ReLU -> Linear`` (no final activation), giving ``f_pre``;
* task encoder **H**: one ``Linear(T -> 400)`` of the one-hot, i.e. a learned vector per task;
* gate input ``g = H(onehot) * f_pre`` (before the ReLU), module-path input ``x0 = relu(f_pre)``;
* gate **G** (Eq. 4): one shared MLP producing every gate logit ``z`` (136 for 16 modules);
* routes and routing weights (Eqs. 5-8, :mod:`.routing`), then the routed block: modules with residual shortcuts
  and the routed output node (Eqs. 9-12, :mod:`.routed_block`);
* head: ``Linear(module_dim -> out)``.

All parameters carry a leading ensemble dimension, so ``n_nets=2`` evaluates the twin critics in one call.
:mod:`d2r_sb3.d2r.reference` is the plain statement of the same computation, against which the tests check this
one; :mod:`.skipping`, above this module, holds the inference path that computes only the modules a route
reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch as th
from torch import nn
from torch.autograd.function import once_differentiable

from d2r_sb3.common.ensemble import EnsembleLinear, EnsembleMLP, output_init_, uniform_
from d2r_sb3.d2r import compiled
from d2r_sb3.d2r.routed_block import BlockPlan, BlockWorkspace, compiled_pass_threads, routed_block
from d2r_sb3.d2r.routing import RoutingGraph, RoutingPath

__all__ = [
    "SHORTCUT_MODES",
    "TOPK",
    "EnsembleLinear",  # re-exported from d2r_sb3.common.ensemble, where it moved
    "EnsembleMLP",
    "RouteRequest",
    "RoutedNetwork",
    "RoutedNetworkConfig",
]

SHORTCUT_MODES: tuple[str, ...] = ("full", "masked")


@dataclass(frozen=True)
class RoutedNetworkConfig:
    """The settings of a :class:`RoutedNetwork` (and of :class:`~d2r_sb3.d2r.policies.D2RPolicy`, which passes
    them on); the defaults are the paper's MT10 network.

    :param n_modules: routed modules ``n`` (16).
    :param module_dim: module width (128).
    :param top_k: sources per node for Top-K routing (2, Eq. 6).
    :param routing: ``"topk"`` (MaskSoftmax over ``top_k`` sources), ``"hard"`` (top-1, keeping the full-softmax
        probability of the source) or ``"soft"`` (every earlier module, full softmax): paper Fig. 7(a).
    :param routing_level: ``"module"`` (D2R), ``"layer"`` or ``"model"`` (paper Fig. 2 and Fig. 7(d)).
    :param n_layers: layers (``"layer"``) or chain length (``"model"``).
    :param encoder_sizes: hidden sizes of the state encoder F (``[400, 400]``); the last is the embedding size.
    :param gate_sizes: hidden sizes of the gate MLP G (``[256, 256]``).
    :param resrouting_shortcut: ``"full"`` (authors' code: the residual shortcut passes the full gradient) or
        ``"masked"`` (paper Eq. 11: the shortcut mixes the masked outputs too).
    """

    n_modules: int = 16
    module_dim: int = 128
    top_k: int = 2
    routing: str = "topk"
    routing_level: str = "module"
    n_layers: int = 4
    encoder_sizes: Sequence[int] = (400, 400)
    gate_sizes: Sequence[int] = (256, 256)
    resrouting_shortcut: str = "full"

    def __post_init__(self) -> None:
        # Tuples: the settings are hashable, compare equal however they were given, and save as they did.
        object.__setattr__(self, "encoder_sizes", tuple(self.encoder_sizes))
        object.__setattr__(self, "gate_sizes", tuple(self.gate_sizes))
        if self.resrouting_shortcut not in SHORTCUT_MODES:
            raise ValueError(
                f"Unknown resrouting_shortcut {self.resrouting_shortcut!r}; choose one of {SHORTCUT_MODES}."
            )
        if len(self.encoder_sizes) < 1:
            raise ValueError("encoder_sizes needs at least one layer size")

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments (the keys of :class:`~d2r_sb3.d2r.policies.D2RPolicy`)."""
        return asdict(self)


@dataclass
class RouteRequest:
    """How a forward pass routes.

    :param explore: SampleK (``True``, Eq. 7) or TopK (``False``, Eq. 6) when no stored route is given.
    :param stored: stored routes ``uint8 [E or 1, B, routed nodes, slots]`` (see :meth:`RoutingGraph.encode`),
        or ``None`` to pick routes now (Eq. 8: weights from the current logits over the stored sources).
    :param resrouting: apply the ResRouting masks (Eq. 10; only changes gradients).
    """

    explore: bool = False
    stored: th.Tensor | None = None
    resrouting: bool = False


TOPK = RouteRequest()


class _MaskSoftmaxFunction(th.autograd.Function):
    """:meth:`RoutedNetwork.mask_softmax` on a CPU as one compiled loop forward and one backward
    (:func:`~d2r_sb3.d2r.compiled.chosen_softmax`, on torch's threads); the softmax in float64."""

    @staticmethod
    def forward(ctx, logits: th.Tensor, positions: th.Tensor, used: np.ndarray) -> th.Tensor:
        ctx.threads = compiled.loop_threads(th.get_num_threads())
        logits_np = np.ascontiguousarray(logits.detach().numpy())
        weights = th.from_numpy(compiled.chosen_softmax(logits_np, positions.numpy(), used, ctx.threads))
        ctx.save_for_backward(weights, positions)
        ctx.used, ctx.n_logits = used, logits.shape[-1]
        return weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: th.Tensor):
        weights, positions = ctx.saved_tensors
        grad_logits = compiled.chosen_softmax_backward(
            grad.contiguous().numpy(), weights.numpy(), positions.numpy(), ctx.used, ctx.n_logits, ctx.threads
        )
        return th.from_numpy(grad_logits), None, None


class _GateInputsFunction(th.autograd.Function):
    """``(relu(f_pre), H(task) * f_pre)``, the modules' and the gate's inputs, as one compiled pass each way
    (:func:`~d2r_sb3.d2r.compiled.gate_inputs`; ``H(task) = weight[:, :, task] + bias``, the task encoder): the
    same values as the tensor operations, bit for bit, and their gradients (the task encoder's summed in
    float64). ``trained_rows`` as in :func:`~d2r_sb3.common.ensemble.ensemble_linear`; ``threads``: the threads
    of the compiled passes (:func:`~d2r_sb3.d2r.routed_block.compiled_pass_threads`)."""

    @staticmethod
    def forward(ctx, f_pre, task_ids, weight, bias, trained_rows, threads):
        x0, gated = compiled.gate_inputs(
            f_pre.detach().numpy(), task_ids.numpy(), weight.detach().numpy(), bias.detach().numpy(), threads
        )
        ctx.save_for_backward(f_pre, task_ids, weight, bias)
        ctx.trained_rows = f_pre.shape[1] if trained_rows is None else trained_rows
        ctx.threads = threads
        return th.from_numpy(x0), th.from_numpy(gated)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x0, grad_gated):
        f_pre, task_ids, weight, bias = ctx.saved_tensors
        trains = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        grad_f, grad_weight, grad_bias = compiled.gate_inputs_backward(
            grad_x0.contiguous().numpy(),
            grad_gated.contiguous().numpy(),
            f_pre.detach().numpy(),
            task_ids.numpy(),
            weight.detach().numpy(),
            bias.detach().numpy(),
            ctx.trained_rows if trains else 0,
            ctx.threads,
        )
        return (
            th.from_numpy(grad_f) if ctx.needs_input_grad[0] else None,
            None,
            th.from_numpy(grad_weight) if ctx.needs_input_grad[2] else None,
            th.from_numpy(grad_bias) if ctx.needs_input_grad[3] else None,
            None,
            None,
        )


class RoutedNetwork(nn.Module):
    """D2R network: encoders, gate, routed modules and head, for ``n_nets`` independent copies.

    :param state_dim: size of the state part of the input (39 for the actor, 43 for the critic).
    :param num_tasks: number of tasks ``T`` (size of the one-hot).
    :param out_dim: head output size (``2 * action_dim`` for the actor, 1 for a critic).
    :param n_nets: ensemble size (1 actor, 2 twin critics).
    :param config: the network settings (:class:`RoutedNetworkConfig`; ``None``: the paper's network).
    :param settings: individual :class:`RoutedNetworkConfig` fields (``n_modules=8``, ...), applied over ``config``.
    """

    # Buffer (registered in __init__).
    route_temperature: th.Tensor

    def __init__(
        self,
        state_dim: int,
        num_tasks: int,
        out_dim: int,
        n_nets: int = 1,
        config: RoutedNetworkConfig | None = None,
        **settings: Any,
    ):
        super().__init__()
        config = replace(config or RoutedNetworkConfig(), **settings)
        self.config = config
        self.num_tasks = num_tasks
        self.n_nets = n_nets
        self.n_modules = n_modules = config.n_modules
        self.module_dim = module_dim = config.module_dim
        self.graph = RoutingGraph(
            n_modules, config.top_k, config.routing, config.routing_level, config.n_layers
        )
        embed_dim = config.encoder_sizes[-1]
        self.state_encoder = EnsembleMLP(n_nets, [state_dim, *config.encoder_sizes], final_relu=False)
        self.task_encoder = EnsembleLinear(n_nets, num_tasks, embed_dim)
        self.gate = EnsembleMLP(
            n_nets, [embed_dim, *config.gate_sizes, self.graph.num_logits], final_relu=False
        )
        n_in = len(self.graph.input_nodes)
        n_hid = n_modules - n_in
        self.w_in = nn.Parameter(th.empty(n_nets, n_in, module_dim, embed_dim))
        self.b_in = nn.Parameter(th.full((n_nets, n_in, module_dim), 0.1))
        self.w_hid = nn.Parameter(th.empty(n_nets, n_hid, module_dim, module_dim))
        self.b_hid = nn.Parameter(th.full((n_nets, n_hid, module_dim), 0.1))
        uniform_(self.w_in, 1.0 / math.sqrt(module_dim))
        uniform_(self.w_hid, 1.0 / math.sqrt(module_dim))
        self.head = EnsembleLinear(n_nets, module_dim, out_dim)
        output_init_(self.head)
        # Per-task routing temperature tau (route balancing, Eqs. 13-14). A buffer, not a parameter: it never has
        # a gradient, and it is overwritten after every update.
        self.register_buffer("route_temperature", th.ones(num_tasks))
        counters = {True: 0, False: 0}
        param_index = []
        for node in range(n_modules):
            is_input = node in self.graph.input_nodes
            param_index.append(counters[is_input])
            counters[is_input] += 1
        self.plan = BlockPlan(
            is_input=tuple(node in self.graph.input_nodes for node in range(n_modules)),
            param_index=tuple(param_index),
            masked_shortcut=config.resrouting_shortcut == "masked",
        )
        self.block_workspace = BlockWorkspace(self.plan)
        # Whether the route choice, MaskSoftmax and the gate inputs may run as compiled loops on the host (they do
        # where the tensors are on a CPU, uses_host_loops); False keeps the tensor operations there too (what GPUs
        # run: no host sync; the tests run them on a CPU through this switch).
        self.host_loops = True

    # ----------------------------------------------------------------------------------------------------
    def encode(
        self, state: th.Tensor, task_ids: th.Tensor, detach: bool = False
    ) -> tuple[th.Tensor, th.Tensor]:
        """State and task encodings: ``(x0 [E, B, embed], padded gate logits [E, B, n + 1, n])``."""
        x0, logits = self.encode_flat(state, task_ids, detach)
        return x0, self.graph.padded_logits(logits)

    def encode_flat(
        self,
        state: th.Tensor,
        task_ids: th.Tensor,
        detach: bool = False,
        dtype: th.dtype | None = None,
        trained_rows: int | None = None,
        input_region: tuple[int, int] | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """``(x0 [E, B, embed], flat gate logits [E, B, L])`` (Eq. 4).

        With a reduced-precision ``dtype`` the encoders and the gate compute in it and ``x0`` stays in it,
        while the gate logits come back in the parameters' dtype: routes, routing weights and ResRouting masks
        are always decided in full precision. ``trained_rows``: only the first ``trained_rows`` samples train the
        encoders and the gate (:func:`~d2r_sb3.common.ensemble.ensemble_linear`); ``input_region``: the corner
        ``state[:, row:, column:]`` that needs a gradient, the rest is constant (``None``: all of it).
        """
        ens = self.n_nets
        if state.dim() == 2:
            state = state.unsqueeze(0).expand(ens, -1, -1)
        if dtype is not None:
            state = state.to(dtype)
        f_pre = self.state_encoder(state, detach, dtype, trained_rows, input_region)
        threads = compiled_pass_threads(f_pre) if dtype is None and self.uses_host_loops(f_pre) else 0
        if threads:
            # One compiled pass each way instead of a lookup, a product, a relu and their backward passes
            # (memory-bound passes over [E, B, 400]), on torch's threads.
            weight, bias = self.task_encoder._weight_and_bias(detach, None)
            if th.is_grad_enabled() and (f_pre.requires_grad or weight.requires_grad):
                x0, gate_input = _GateInputsFunction.apply(
                    f_pre, task_ids, weight, bias, trained_rows, threads
                )
            else:
                inputs = (f_pre.numpy(), task_ids.numpy(), weight.numpy(), bias.numpy())
                x0, gate_input = map(th.from_numpy, compiled.gate_inputs(*inputs, threads))
        else:
            # H(onehot) = W onehot + b: a lookup of W's columns, whose backward is the one-hot matmul's.
            task_embedding = self.task_encoder.lookup(task_ids, detach, dtype, trained_rows)
            # The gate input is taken before the ReLU.
            x0, gate_input = th.relu(f_pre), task_embedding * f_pre
        gate_logits = self.gate(gate_input, detach, dtype, trained_rows)
        if dtype is not None:
            gate_logits = gate_logits.to(self.task_encoder.weight.dtype)
        return x0, gate_logits

    def uses_host_loops(self, like: th.Tensor) -> bool:
        """Whether this call's route choice, MaskSoftmax and gate inputs may be compiled host loops
        (:mod:`~d2r_sb3.d2r.compiled`) for tensors like ``like``: on a CPU, unless :attr:`host_loops` is off (the
        gate inputs only where :func:`~d2r_sb3.d2r.routed_block.compiled_pass_threads` allows)."""
        return self.host_loops and like.device.type == "cpu"

    def choose_routes(
        self, logits: th.Tensor, task_ids: th.Tensor, route: RouteRequest
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """``(sources, weights, keep)`` for flat gate logits: the chosen sources (Eqs. 6-8), their routing weights
        ``[E, B, n + 1, slots]`` (differentiable) and the ResRouting mask (Eq. 10; ``None`` without ResRouting).

        Sources and ResRouting masks need no gradient; with Top-K routing they come from one pass over the flat
        logits (:meth:`RoutingGraph.top_routes <d2r_sb3.d2r.routing.RoutingGraph.top_routes>`, compiled on a
        CPU) and the weights straight from the chosen logits (:meth:`mask_softmax`), so no padded tensor enters
        the autograd graph.
        """
        if self.graph.routing != "topk":
            padded = self.graph.padded_logits(logits)
            sources = self.choose_sources(padded.detach(), task_ids, route)
            keep = self.graph.keep_mask(padded.detach(), sources) if route.resrouting else None
            # Hard and soft routing weigh each chosen source by its full-softmax probability.
            return sources, th.softmax(padded, dim=-1).gather(-1, sources) * self.graph.slot_valid, keep
        sources, positions, keep = self._top_routes(logits, task_ids, route)
        return sources, self._chosen_weights(logits, positions), keep

    def _top_routes(
        self, logits: th.Tensor, task_ids: th.Tensor, route: RouteRequest
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Top-K routing's choice, which needs no gradient: ``(sources, positions, keep)``, the flat positions of
        the chosen sources' logits in ``logits`` (for :meth:`_chosen_weights`)."""
        with th.no_grad():
            given = self.graph.decode(route.stored) if route.stored is not None else None
            temperature = self.route_temperature[task_ids] if route.explore else None
            return self.graph.top_routes(
                logits.detach(),
                temperature,
                route.explore,
                given,
                route.resrouting,
                self.uses_host_loops(logits),
            )

    def _chosen_weights(self, logits: th.Tensor, positions: th.Tensor) -> th.Tensor:
        """Top-K routing's weights (MaskSoftmax of the chosen logits, differentiable)."""
        if self.uses_host_loops(logits) and logits.dtype in (th.float32, th.float64):
            # The same weights as one compiled pass each way (a dozen small tensor operations otherwise).
            return _MaskSoftmaxFunction.apply(logits, positions, self.graph.slots_used_host)
        return self.mask_softmax(logits, positions)

    def mask_softmax(self, logits: th.Tensor, positions: th.Tensor) -> th.Tensor:
        """MaskSoftmax (Eqs. 5 and 8): the softmax of the un-tempered logits of the chosen sources only.

        :param logits: flat gate logits ``[E, B, L]``.
        :param positions: the flat positions of the chosen sources' logits ``[E or 1, B, n + 1, k]`` (unused
            slots: any position, weight 0), as :meth:`RoutingGraph.top_routes
            <d2r_sb3.d2r.routing.RoutingGraph.top_routes>` gives them.
        :return: weights ``[E, B, n + 1, k]``, zero on unused slots; each routed node's weights sum to 1.
        """
        lead = logits.shape[:-1]
        position = positions.expand(*lead, *positions.shape[-2:])
        chosen = logits.gather(-1, position.reshape(*lead, -1)).view(position.shape)
        valid = self.graph.slot_valid
        if chosen.shape[-1] == 2:
            # softmax(a, b) = (sigmoid(a - b), sigmoid(b - a)); a single valid source gets weight 1.
            diff = th.where(valid[:, 1], chosen[..., 0] - chosen[..., 1], float("inf"))
            probs = th.sigmoid(th.stack([diff, -diff], dim=-1))
        else:
            unused = th.where(valid.any(-1, keepdim=True), float("-inf"), 0.0).to(chosen.dtype)
            probs = th.softmax(th.where(valid, chosen, unused), dim=-1)
        return probs * valid

    def choose_sources(
        self, padded: th.Tensor, task_ids: th.Tensor, route: RouteRequest, logits: th.Tensor | None = None
    ) -> th.Tensor:
        """Module indices ``[E, B, n + 1, slots]`` of the chosen sources for this request (``logits``: the flat
        logits behind ``padded``, if at hand; see :meth:`RoutingGraph.select`)."""
        if route.stored is not None:
            return self.graph.decode(route.stored).expand(self.n_nets, -1, -1, -1)
        temperature = self.route_temperature[task_ids] if route.explore else None
        return self.graph.select(padded, temperature, route.explore, logits)

    def forward(
        self,
        state: th.Tensor,
        task_ids: th.Tensor,
        route: RouteRequest = TOPK,
        detach_params: bool = False,
        compute_dtype: th.dtype | None = None,
    ) -> tuple[th.Tensor, th.Tensor]:
        """Run the network.

        :param state: ``[B, state_dim]`` (shared by the ensemble) or ``[E, B, state_dim]``.
        :param task_ids: ``[B]`` long task indices.
        :param route: how to route (TopK by default).
        :param detach_params: use detached parameters, so gradients reach the inputs only (the Q value in
            the actor loss, which must not train the critic).
        :param compute_dtype: ``None`` (float32) or a reduced precision such as ``th.bfloat16`` for the
            matrix products and the routed block's activations (mixed precision: the parameters, the
            routing decisions, the head and the output stay float32). On a CPU the routed block itself stays
            float32 (``block_workspace.reduced_precision``, :class:`~d2r_sb3.d2r.routed_block.BlockWorkspace`).
        :return: ``(out [E, B, out_dim], sources [E, B, n + 1, slots])`` (``out`` in the parameters' dtype).
        """
        if compute_dtype == self.head.weight.dtype:
            compute_dtype = None  # the plain path: no casts
        x0, logits = self.encode_flat(state, task_ids, detach_params, compute_dtype)
        sources, weights, keep = self.choose_routes(logits, task_ids, route)
        return self._modules_and_head(x0, sources, weights, keep, detach_params, compute_dtype, None), sources

    def forward_pair(
        self,
        state: th.Tensor,
        task_ids: th.Tensor,
        route: RouteRequest,
        frozen_state: th.Tensor,
        frozen_task_ids: th.Tensor,
        frozen_route: RouteRequest,
        compute_dtype: th.dtype | None = None,
        constant_columns: int = 0,
    ) -> tuple[th.Tensor, th.Tensor]:
        """Two batches in one pass over the same parameters: the first trains them, as :meth:`forward` does; for
        the second (``frozen_*``) they are constants, as with ``detach_params=True``: its gradient reaches its
        inputs only.

        Equal in values and gradients to the two calls ``forward(state, task_ids, route)`` and
        ``forward(frozen_state, frozen_task_ids, frozen_route, detach_params=True)``, made in that order (the
        routes are chosen in that order too, so SampleK draws the same noise), with half the calls: the
        multi-task SAC update evaluates its critics this way for the TD regression and the actor loss, which
        both use the parameters from before the update.

        :param state: ``[B, state_dim]`` or ``[E, B, state_dim]``; ``frozen_state`` the same with ``B'`` rows.
        :param constant_columns: the first ``constant_columns`` columns of both inputs are constants (the
            critics' observations): the input gradient of the first layer is not computed for them.
        :return: ``(out [E, B, out_dim], frozen_out [E, B', out_dim])``.
        """
        if compute_dtype == self.head.weight.dtype:
            compute_dtype = None
        rows = task_ids.shape[0]
        # Only the inputs that need a gradient get one from the first layer (the actor loss's actions).
        input_region = (0 if state.requires_grad else rows, constant_columns)
        x0, logits = self.encode_flat(
            th.cat([state, frozen_state], dim=-2),
            th.cat([task_ids, frozen_task_ids]),
            False,
            compute_dtype,
            trained_rows=rows,
            input_region=input_region,
        )
        if self.graph.routing == "topk":
            # Each half's routes chosen in turn, then the weights of both as one MaskSoftmax over all the logits:
            # its backward writes their gradient in one piece (two halves would be padded to the full logits and
            # added).
            (sources, positions, keep), (frozen_sources, frozen_positions, frozen_keep) = (
                self._top_routes(logits[:, half], ids, request)
                for half, ids, request in (
                    (slice(None, rows), task_ids, route),
                    (slice(rows, None), frozen_task_ids, frozen_route),
                )
            )
            lead = logits.shape[:1]
            positions = th.cat([p.expand(*lead, *p.shape[1:]) for p in (positions, frozen_positions)], 1)
            weights = self._chosen_weights(logits, positions)
            shapes = (weights[:, :rows].shape, weights[:, rows:].shape)
        else:
            (sources, weights, keep), (frozen_sources, frozen_weights, frozen_keep) = (
                self.choose_routes(logits[:, :rows], task_ids, route),
                self.choose_routes(logits[:, rows:], frozen_task_ids, frozen_route),
            )
            shapes = (weights.shape, frozen_weights.shape)
            weights = th.cat([weights, frozen_weights], 1)
        sources = th.cat([sources.expand(shapes[0]), frozen_sources.expand(shapes[1])], 1)
        if keep is not None or frozen_keep is not None:
            # A half without ResRouting keeps every source (plain gradients).
            keep, frozen_keep = (
                k.expand(shape) if k is not None else weights.new_ones(shape, dtype=th.bool)
                for k, shape in zip((keep, frozen_keep), shapes, strict=True)
            )
            keep = th.cat([keep, frozen_keep], 1)
        out = self._modules_and_head(x0, sources, weights, keep, False, compute_dtype, rows)
        return out[:, :rows], out[:, rows:]

    def _modules_and_head(
        self,
        x0: th.Tensor,
        sources: th.Tensor,
        weights: th.Tensor,
        keep: th.Tensor | None,
        detach_params: bool,
        compute_dtype: th.dtype | None,
        trained_rows: int | None,
    ) -> th.Tensor:
        """The routed block and the head on chosen routes: ``out [E, B, out_dim]`` (see :meth:`forward`)."""
        params: tuple[th.Tensor, ...] = (self.w_in, self.b_in, self.w_hid, self.b_hid)
        if detach_params:
            params = tuple(p.detach() for p in params)
        if compute_dtype is not None and not self.block_workspace.computes_reduced(x0.device):
            x0, compute_dtype = x0.to(self.head.weight.dtype), None  # the block in full precision (CPU)
        if compute_dtype is not None:
            params = tuple(p.to(compute_dtype) for p in params)
            weights = weights.to(compute_dtype)
        w_in, b_in, w_hid, b_hid = params
        y = routed_block(
            x0, w_in, b_in, w_hid, b_hid, weights, sources, keep, self.block_workspace, trained_rows
        )
        if compute_dtype is not None:
            y = y.to(self.head.weight.dtype)  # the head (Q value, action mean / log-std) in full precision
        return self.head(y, detach_params, trained_rows=trained_rows)

    @th.no_grad()
    def routing_path(self, state: th.Tensor, task_ids: th.Tensor, route: RouteRequest = TOPK) -> RoutingPath:
        """Routing path ``[E, B, ...]`` the network takes for these inputs (no module is computed)."""
        _, padded = self.encode(state, task_ids)
        sources = self.choose_sources(padded, task_ids, route)
        return self.graph.path(padded, sources)
