"""CARE (Sodhani, Zhang, Pineau, "Multi-Task Reinforcement Learning with Context-based Representations",
ICML 2021) on the multi-task SAC core (alias ``"CAREPolicy"``).

Network, for state ``s`` (and, for a critic, the action ``a``, which joins after the encoders) and task ``tau``::

    z_tau   = C(e_tau)                          task context: an MLP on the task's embedding
    z_i     = encoder_i(s)                      k state encoders (the mixture of encoders)
    alpha   = softmax(A(z_tau) / temperature)   attention over the encoders, from the context alone
    z_enc   = sum_i alpha_i z_i                 the mixture's encoding of the state
    y       = MLP([z_enc, z_tau(, a)])          context-enriched representation -> SAC actor / critic trunk

``e_tau`` is, in the paper, a frozen language-model embedding of the task's description (RoBERTa in the authors'
code), passed through a small projection MLP. Pass such embeddings with ``task_embeddings``: a JSON file mapping
task names to vectors (the format of the authors' ``metadata/task_embedding/roberta_small/metaworld-mt10.json``), an
``.npz`` archive of one array per task name, an ``.npy`` array ``[T, P]`` in one-hot order, a mapping, or an array.
See :func:`load_task_embeddings` for the matching of names to one-hot positions and the checks.

Defaults are the authors' MT10 configuration (``facebookresearch/mtrl``, the CARE command of its baseline
tutorial and ``config/agent/components/metaworld_*.yaml``): ``k = 4`` encoders, each an MLP ``[in, 50, 50]``;
embedding size 50, context MLP ``[50, 50, 50, 50]`` (with embeddings: projection ``[P, 100, 50]`` first), attention
MLP ``[50, 50, 50, k]`` at temperature 1 on the detached context, trunk ``[400, 400, 400]`` on ``[z_enc, z_tau]``,
one output head. We keep the same configuration on MT50. Parameters of one network (``in`` = state size, ``x`` = 0
for the actor, the action size for a critic)::

    k * mlp([in, 50, 50]) + T * 50 (learned embedding) or mlp([P, 100, 50]) (embeddings)
      + mlp([50, 50, 50, 50]) + mlp([50, 50, 50, k]) + mlp([100 + x, 400, 400, 400, out])

which is 396,062 for the MT10 actor with the learned embedding (477,512 with 768-d RoBERTa embeddings).

Deviations (documented choices):

* **Learned task embedding by default.** Without ``task_embeddings``, ``e_tau`` is a learned ``T x 50`` table (the
  authors' code path without pretrained embeddings), so CARE runs without a language model; the paper's setting
  needs the embeddings file.
* **Separate encoders per network.** In the authors' code the actor shares the critic's encoders and task encoder
  (tied weights, detached in the actor update, trained by the critic loss only). Here the actor and each critic
  have their own complete CARE network trained by their own loss, as every other method of the core.
* **Initialisation** is the comparison's common scheme (:mod:`d2r_sb3.baselines.mlp`; the code uses Xavier) and a
  standard-normal learned embedding (``nn.Embedding``'s default, as in the code).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from d2r_sb3.baselines.actor_critic import TaskNetworkPolicy
from d2r_sb3.baselines.grouped import GroupedMLP
from d2r_sb3.common.ensemble import EnsembleLinear, output_init_
from d2r_sb3.d2r.network import EnsembleMLP

__all__ = ["CARENetwork", "CAREPolicy", "TaskEmbeddings", "care_parameter_count", "load_task_embeddings"]

TaskEmbeddings = str | os.PathLike | Mapping[str, Sequence[float]] | Sequence[Sequence[float]] | np.ndarray
"""What ``task_embeddings`` accepts: a file path, a name -> vector mapping, or a ``[T, P]`` array."""


def _short_name(name: str) -> str:
    """``"reach-v2" -> "reach"``: embedding files name tasks with the Meta-World version of their time."""
    return re.sub(r"-v\d+$", "", str(name))


def _check_rows(rows: np.ndarray, num_tasks: int, where: str) -> np.ndarray:
    if rows.ndim != 2 or rows.shape[0] != num_tasks or rows.shape[1] < 1:
        raise ValueError(
            f"Task embeddings from {where} must be a [num_tasks, dim] array ({num_tasks} rows, one per task in one-hot "
            f"order), got shape {rows.shape}."
        )
    if not np.isfinite(rows).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(rows))[:, 0]})
        raise ValueError(f"Task embeddings from {where} hold NaN or infinite values in row(s) {bad}.")
    return rows.astype(np.float32)


def _vector(value: Any, name: str, where: str) -> np.ndarray:
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"The embedding of task {name!r} in {where} is not a list of numbers.") from None
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(
            f"The embedding of task {name!r} in {where} must be a non-empty 1-D vector, got shape {vector.shape}."
        )
    return vector


def _default_task_names(num_tasks: int) -> list[str] | None:
    """Meta-World's MT10 / MT50 task names for 10 / 50 tasks (the order of make_mt_env's one-hot)."""
    if num_tasks not in (10, 50):
        return None
    from d2r_sb3.envs.metaworld import benchmark_task_names

    return benchmark_task_names(f"MT{num_tasks}")


def _rows_from_mapping(
    mapping: Mapping[str, Any], num_tasks: int, task_names: Sequence[str] | None, where: str
) -> np.ndarray:
    names = list(task_names) if task_names is not None else _default_task_names(num_tasks)
    if names is None:
        raise ValueError(
            f"Task embeddings in {where} are keyed by task name, but the one-hot order of the {num_tasks} tasks is "
            "unknown: pass task_names (e.g. policy_kwargs=dict(task_names=env.task_names)) or a [T, dim] array."
        )
    if len(names) != num_tasks:
        raise ValueError(f"task_names has {len(names)} names for {num_tasks} tasks: {names}.")
    by_short = {_short_name(key): key for key in mapping}
    missing = [name for name in names if name not in mapping and _short_name(name) not in by_short]
    if missing:
        raise ValueError(
            f"{where} has no embedding for task(s) {missing} (it has: {sorted(mapping)[:12]}"
            f"{' ...' if len(mapping) > 12 else ''}); names match with or without the '-vN' suffix."
        )
    vectors = [
        _vector(mapping[name] if name in mapping else mapping[by_short[_short_name(name)]], name, where)
        for name in names
    ]
    sizes = {v.size for v in vectors}
    if len(sizes) != 1:
        raise ValueError(f"The task embeddings in {where} have different lengths: {sorted(sizes)}.")
    return np.stack(vectors)


def load_task_embeddings(
    source: TaskEmbeddings, num_tasks: int, task_names: Sequence[str] | None = None
) -> np.ndarray:
    """Task-description embeddings as a float32 ``[T, dim]`` array, rows in one-hot order.

    :param source: a ``.json`` file ``{task name: [floats]}``, an ``.npz`` file of one 1-D array per task name, an
        ``.npy`` file ``[T, dim]`` (rows in one-hot order), a mapping name -> vector, or a ``[T, dim]`` array.
    :param num_tasks: number of tasks ``T``.
    :param task_names: the tasks in one-hot order, to look names up (``env.task_names``). ``None``: Meta-World's
        MT10 / MT50 order for 10 / 50 tasks. Names match with or without their ``-vN`` suffix; extra names in the
        source are ignored.
    :raises ValueError: unreadable file or unknown suffix, a task without an embedding, vectors of different
        lengths, a wrong shape, non-numeric or non-finite values.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ValueError(f"Task embeddings file {where} does not exist.")
        suffix = path.suffix.lower()
        if suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from None
            if not isinstance(data, dict):
                raise ValueError(
                    f"{where} must hold a JSON object {{task name: [floats]}}, got {type(data).__name__}."
                )
            return _check_rows(_rows_from_mapping(data, num_tasks, task_names, where), num_tasks, where)
        if suffix in (".npz", ".npy"):
            try:
                loaded = np.load(path, allow_pickle=False)  # never unpickle a user file
            except (ValueError, OSError) as error:
                raise ValueError(f"{where} is not a NumPy {suffix} file of numbers: {error}") from None
            if suffix == ".npz":
                with loaded:
                    data = {key: loaded[key] for key in loaded.files}
                return _check_rows(_rows_from_mapping(data, num_tasks, task_names, where), num_tasks, where)
            return _check_rows(np.asarray(loaded, dtype=np.float64), num_tasks, where)
        raise ValueError(f"Task embeddings file {where}: unknown suffix {suffix!r}; use .json, .npz or .npy.")
    if isinstance(source, Mapping):
        return _check_rows(
            _rows_from_mapping(source, num_tasks, task_names, "the mapping"), num_tasks, "the mapping"
        )
    try:
        rows = np.asarray(source, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            "task_embeddings must be a file path, a mapping task name -> vector or a [T, dim] array of numbers."
        ) from None
    return _check_rows(rows, num_tasks, "the array")


class CARENetwork(nn.Module):
    """``n_nets`` CARE networks (an ensemble, for the twin critics).

    :param in_dim: input size without the task one-hot; its last ``passthrough_dim`` entries skip the encoders.
    :param num_tasks: number of tasks ``T``.
    :param out_dim: output size.
    :param n_nets: ensemble size (1 actor, ``n_critics`` critics).
    :param passthrough_dim: trailing input entries fed to the trunk directly (the action, for a critic).
    :param task_embeddings: frozen ``[T, P]`` description embeddings (``None``: a learned ``T x embedding_dim`` table).
    :param n_experts: encoders ``k`` in the mixture.
    :param encoder_sizes: layer sizes of one encoder; the last is the encoding size.
    :param embedding_dim: size of the (learned or projected) task embedding.
    :param context_sizes: hidden sizes of the context MLP ``C``.
    :param context_dim: size of the context ``z_tau``.
    :param attention_sizes: hidden sizes of the attention MLP ``A``.
    :param attention_temperature: softmax temperature of the attention.
    :param detach_context_for_attention: the attention reads a detached context (authors' code), so the context is
        trained through the trunk only.
    :param hidden_sizes: hidden sizes of the trunk on ``[z_enc, z_tau]``.
    """

    # Learned task embeddings, or (with ``task_embeddings``) the frozen description embeddings and their projection.
    task_embedding: nn.Parameter | None
    projection: EnsembleMLP | None
    description_embeddings: th.Tensor

    def __init__(
        self,
        in_dim: int,
        num_tasks: int,
        out_dim: int,
        n_nets: int = 1,
        passthrough_dim: int = 0,
        task_embeddings: np.ndarray | None = None,
        n_experts: int = 4,
        encoder_sizes: Sequence[int] = (50, 50),
        embedding_dim: int = 50,
        context_sizes: Sequence[int] = (50, 50),
        context_dim: int = 50,
        attention_sizes: Sequence[int] = (50, 50),
        attention_temperature: float = 1.0,
        detach_context_for_attention: bool = True,
        hidden_sizes: Sequence[int] = (400, 400, 400),
    ):
        super().__init__()
        for name, sizes in (("encoder_sizes", encoder_sizes), ("hidden_sizes", hidden_sizes)):
            if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
                raise ValueError(f"{name} must be a non-empty list of positive sizes, got {sizes}.")
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"n_experts must be a positive int, got {n_experts!r}.")
        if not attention_temperature > 0:
            raise ValueError(f"attention_temperature must be > 0, got {attention_temperature}.")
        self.num_tasks = num_tasks
        self.n_nets = n_nets
        self.n_experts = n_experts
        self.state_dim = in_dim - passthrough_dim
        self.attention_temperature = float(attention_temperature)
        self.detach_context_for_attention = detach_context_for_attention
        self.encoders = GroupedMLP(n_nets, n_experts, [self.state_dim, *encoder_sizes], final_relu=False)
        if task_embeddings is None:
            self.task_embedding = nn.Parameter(th.randn(n_nets, num_tasks, embedding_dim))
            self.projection = None
        else:
            embeddings = th.as_tensor(np.asarray(task_embeddings), dtype=th.float32)
            if embeddings.shape[0] != num_tasks:
                raise ValueError(f"task_embeddings has {embeddings.shape[0]} rows for {num_tasks} tasks.")
            self.register_buffer("description_embeddings", embeddings)  # frozen: saved, never trained
            self.task_embedding = None
            self.projection = EnsembleMLP(
                n_nets, [embeddings.shape[1], 2 * embedding_dim, embedding_dim], final_relu=True
            )
        self.context = EnsembleMLP(n_nets, [embedding_dim, *context_sizes, context_dim], final_relu=False)
        self.attention = EnsembleMLP(n_nets, [context_dim, *attention_sizes, n_experts], final_relu=False)
        self.trunk = EnsembleMLP(
            n_nets,
            [encoder_sizes[-1] + context_dim + passthrough_dim, *hidden_sizes, out_dim],
            final_relu=False,
        )
        output_init_(cast(EnsembleLinear, self.trunk.layers[-1]))  # (an EnsembleMLP's layers)

    def task_contexts(self, detach: bool = False) -> tuple[th.Tensor, th.Tensor]:
        """Every task's context ``z_tau [E, T, context_dim]`` and attention ``alpha [E, T, k]``."""
        if self.task_embedding is not None:
            table = self.task_embedding.detach() if detach else self.task_embedding
            embedding = th.relu(table)
        else:
            assert self.projection is not None  # (made whenever task_embedding is not)
            described = th.relu(self.description_embeddings).expand(self.n_nets, -1, -1)
            embedding = self.projection(described, detach)
        context = self.context(embedding, detach)
        attention_input = context.detach() if self.detach_context_for_attention else context
        logits = self.attention(attention_input, detach)
        return context, th.softmax(logits / self.attention_temperature, dim=-1)

    def forward(self, x: th.Tensor, task_ids: th.Tensor, detach: bool = False) -> th.Tensor:
        """``x [B, in_dim]``, ``task_ids [B]`` -> ``[n_nets, B, out_dim]``.

        :param detach: use detached parameters (gradient reaches the inputs only).
        """
        state, passthrough = x[:, : self.state_dim], x[:, self.state_dim :]
        contexts, attentions = self.task_contexts(detach)
        context, attention = contexts[:, task_ids], attentions[:, task_ids]  # [E, B, ctx], [E, B, k]
        batch = x.shape[0]
        encodings = self.encoders(state.expand(self.n_nets, self.n_experts, batch, self.state_dim), detach)
        encoding = th.einsum("ebk,ekbf->ebf", attention, encodings)  # the attention-weighted mixture
        parts = [encoding, context]
        if passthrough.shape[-1]:
            parts.append(passthrough.expand(self.n_nets, batch, passthrough.shape[-1]))
        return self.trunk(th.cat(parts, dim=-1), detach)


def care_parameter_count(
    state_dim: int,
    num_tasks: int,
    out_dim: int,
    passthrough_dim: int = 0,
    embedding_size: int | None = None,
    n_experts: int = 4,
) -> int:
    """Parameters of one default-sized :class:`CARENetwork` (the formula of the module docstring).

    :param embedding_size: size ``P`` of description embeddings (``None``: the learned embedding).
    """

    def mlp(sizes: list[int]) -> int:
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=False))

    embedding = num_tasks * 50 if embedding_size is None else mlp([embedding_size, 100, 50])
    return (
        n_experts * mlp([state_dim, 50, 50])
        + embedding
        + mlp([50, 50, 50, 50])
        + mlp([50, 50, 50, n_experts])
        + mlp([100 + passthrough_dim, 400, 400, 400, out_dim])
    )


class CAREPolicy(TaskNetworkPolicy):
    """CARE actor and twin critics (alias ``"CAREPolicy"``); defaults are the authors' MT10 settings.

    :param num_tasks: number of tasks (set by the algorithm from the env).
    :param task_embeddings: description embeddings (file, mapping or array, see :func:`load_task_embeddings`);
        ``None``: a learned task embedding (the default; a deviation from the paper).
    :param task_names: the tasks in one-hot order, to match names in ``task_embeddings`` (``None``: Meta-World's
        MT10 / MT50 order for 10 / 50 tasks).
    :param n_experts: encoders in the mixture (4).
    :param encoder_sizes: layer sizes of an encoder (``[50, 50]``).
    :param embedding_dim: task embedding size (50).
    :param context_sizes: hidden sizes of the context MLP (``[50, 50]``).
    :param context_dim: context size (50).
    :param attention_sizes: hidden sizes of the attention MLP (``[50, 50]``).
    :param attention_temperature: attention softmax temperature (1.0).
    :param detach_context_for_attention: the attention reads a detached context (``True``, authors' code).
    :param hidden_sizes: trunk hidden sizes of the actor and the critics (``[400, 400, 400]``).
    :param n_critics: number of Q networks.

    The safe format (:func:`~d2r_sb3.save_policy`) stores the embeddings themselves (a ``[T, dim]`` list), so a
    saved policy loads without the file; an SB3 zip (``model.save``) records ``policy_kwargs`` as given (the path).
    """

    def __init__(
        self,
        observation_space: spaces.Box,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        num_tasks: int,
        task_embeddings: TaskEmbeddings | None = None,
        task_names: Sequence[str] | None = None,
        n_experts: int = 4,
        encoder_sizes: Sequence[int] = (50, 50),
        embedding_dim: int = 50,
        context_sizes: Sequence[int] = (50, 50),
        context_dim: int = 50,
        attention_sizes: Sequence[int] = (50, 50),
        attention_temperature: float = 1.0,
        detach_context_for_attention: bool = True,
        hidden_sizes: Sequence[int] = (400, 400, 400),
        n_critics: int = 2,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        self.task_names = list(task_names) if task_names is not None else None
        self.task_embeddings = (
            None if task_embeddings is None else load_task_embeddings(task_embeddings, num_tasks, task_names)
        )
        self.net_kwargs: dict[str, Any] = dict(
            n_experts=n_experts,
            encoder_sizes=list(encoder_sizes),
            embedding_dim=embedding_dim,
            context_sizes=list(context_sizes),
            context_dim=context_dim,
            attention_sizes=list(attention_sizes),
            attention_temperature=attention_temperature,
            detach_context_for_attention=detach_context_for_attention,
            hidden_sizes=list(hidden_sizes),
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            num_tasks,
            n_critics,
            optimizer_class,
            optimizer_kwargs,
        )

    def make_network(self, role: str, in_dim: int, out_dim: int, n_nets: int) -> CARENetwork:
        # The critic's input is [state, action]: the action skips the encoders and joins the trunk (authors' code).
        passthrough = in_dim - self.state_dim
        return CARENetwork(
            in_dim,
            self.num_tasks,
            out_dim,
            n_nets,
            passthrough_dim=passthrough,
            task_embeddings=self.task_embeddings,
            **self.net_kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # with net_kwargs
        # Plain values for the safe format: the resolved [T, dim] rows (no file needed to load), not the path.
        embeddings = None if self.task_embeddings is None else self.task_embeddings.tolist()
        data.update(task_embeddings=embeddings, task_names=self.task_names)
        return data
