"""Resume seeds: the learned state of a multi-task SAC run in one small, safe file, to start a new run from.

A checkpoint (:mod:`d2r_sb3.common.checkpoints`) continues a run exactly, but it holds the replay buffer (about
450 MB on MT10) and pickled optimisers. A **resume seed** keeps only what learning built, so that a new run can
start from it (a *warm start*, :func:`warm_start`) when the run's folder is lost:

==========================  =====================================================================================
tensor                      what
==========================  =====================================================================================
``actor.*``                 the actor's state dict (D2R: its per-task routing temperatures ``route_temperature``)
``critic.*``                the twin critics
``critic_target.*``         their target networks (optional: a seed without them warm-starts the targets from
                            the critics)
``log_ent_coef``            the learned log entropy coefficient(s), one per task (absent for a fixed ``ent_coef``)
==========================  =====================================================================================

The description also carries the run's evaluation history up to the seed's steps (:attr:`ResumeSeed.evaluations`,
a few KB), when the seed is written from a zoo run that has one: the learning curve survives with the weights.

The tensors are the policy's ``state_dict()`` under its own names, stored with safetensors; the file's
safetensors metadata holds, under :data:`SEED_METADATA_KEY`, a JSON object with the format version, the registry
name of the algorithm, the policy alias and its constructor keyword arguments (:mod:`.json_codec`), the spaces,
the task names, the ``make_mt_env`` keyword arguments, the env steps and gradient updates done, and where the
seed was written from. Reading a seed never unpickles anything. There are no optimiser moments, no replay buffer
and no RNG states: a warm start begins with fresh Adam moments and an empty buffer.

The default D2R network on MT10 gives a seed of about 13.7 MB (actor 2.7 MB, twin critics 5.5 MB, their targets
5.5 MB); without the targets about 8.2 MB. A **float16 seed** (:meth:`ResumeSeed.with_matrices_in_float16`) stores the
weight matrices (every tensor of two or more dimensions) in float16 and the rest (biases, routing temperatures,
``log alpha``) unchanged: half the size (about 4.1 MB without the targets), and a warm start loads the matrices as
float16 rounded them (relative error at most 2**-11, about 5e-4). It suits a seed that exists only to survive the
loss of a machine, where the fresh optimiser moments and empty replay buffer already perturb the run far more.

Usage::

    write_seed(seed_from_model(model), "seeds/MT10-rand-1M.safetensors")
    ...
    model = D2RSAC("D2RPolicy", make_mt_env("MT10"), **same_hyperparameters)
    warm_start(model, read_seed("seeds/MT10-rand-1M.safetensors"))
    model.learn(total - model.num_timesteps, reset_num_timesteps=False)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch as th
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from d2r_sb3.common.files import atomic_write_bytes
from d2r_sb3.common.mt_sac import MultiTaskSAC
from d2r_sb3.common.nonfinite import first_nonfinite_tensor
from d2r_sb3.common.provenance import versions
from d2r_sb3.serialization.json_codec import encode_box, encode_kwarg, policy_kwargs
from d2r_sb3.serialization.safe_format import _policy_alias, infer_algo

__all__ = [
    "LOG_ENT_COEF",
    "SEED_FORMAT_VERSION",
    "SEED_METADATA_KEY",
    "SEED_PRECISIONS",
    "ResumeSeed",
    "SeedMismatchError",
    "check_seed_fits",
    "is_seed_file",
    "read_seed",
    "seed_from_model",
    "warm_start",
    "write_seed",
]

SEED_FORMAT_VERSION = 1
SEED_METADATA_KEY = "d2r_sb3_resume_seed"
"""The safetensors metadata entry holding a seed's JSON description (what tells a seed from other files)."""
LOG_ENT_COEF = "log_ent_coef"
"""Name of the learned log entropy coefficient tensor in a seed."""
POLICY_PARTS = ("actor", "critic", "critic_target")
_REQUIRED_KEYS = (
    "format_version",
    "algo",
    "policy_class",
    "policy_kwargs",
    "num_tasks",
    "task_names",
    "num_timesteps",
    "n_updates",
)
_WRITE_SEED = "python zoo/train.py --write-seed RUN -o FILE"
SEED_PRECISIONS = ("float32", "float16")
"""How a seed may store its weight matrices (``--seed-precision``)."""
_FLOAT16_MAX = float(th.finfo(th.float16).max)


class SeedMismatchError(ValueError):
    """A seed does not fit a model: another algorithm, policy class or network shape.

    :param message: what differs and how to fix it.
    :param key: the first differing entry (``"algo"``, ``"policy_class"``, a tensor name such as
        ``"actor.net.w_in"``, or ``"log_ent_coef"``).
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class ResumeSeed:
    """The learned state of a run: the policy's tensors, ``log alpha`` and the counters (see the module doc).

    :param tensors: the policy's state dict (``actor.*``, ``critic.*`` and, normally, ``critic_target.*``), on
        the CPU.
    :param log_ent_coef: the learned ``log alpha`` (``None`` when ``ent_coef`` was fixed).
    :param config: the JSON description: ``algo``, ``policy_class``, ``policy_kwargs``, ``num_tasks``,
        ``task_names``, ``env_kwargs``, ``num_timesteps``, ``n_updates``, ...
    :param path: the file it was read from, if any.
    """

    tensors: dict[str, th.Tensor]
    log_ent_coef: th.Tensor | None
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def algo(self) -> str | None:
        """Registry name of the algorithm (``"d2r"``, ``"mtsac"``, ...), ``None`` if unknown."""
        return self.config.get("algo")

    @property
    def policy_class(self) -> str:
        """The policy alias (``"D2RPolicy"``)."""
        return str(self.config["policy_class"])

    @property
    def num_timesteps(self) -> int:
        """Env steps (summed over tasks) the run had done."""
        return int(self.config["num_timesteps"])

    @property
    def n_updates(self) -> int:
        """Gradient steps the run had done."""
        return int(self.config["n_updates"])

    @property
    def task_names(self) -> list[str]:
        return list(self.config["task_names"])

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """``make_mt_env`` keyword arguments of the run's env (may be empty)."""
        return dict(self.config.get("env_kwargs") or {})

    @property
    def has_critic_target(self) -> bool:
        """Whether the seed holds the critics' target networks (else :func:`warm_start` copies the critics)."""
        return any(name.startswith("critic_target.") for name in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (the file adds a small header)."""
        tensors = [*self.tensors.values(), *([self.log_ent_coef] if self.log_ent_coef is not None else [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def policy_state_dict(self) -> dict[str, th.Tensor]:
        """The policy's full state dict: the targets are the critics' tensors when the seed has no targets."""
        state = dict(self.tensors)
        if not self.has_critic_target:
            for name, tensor in self.tensors.items():
                if name.startswith("critic."):
                    state["critic_target." + name[len("critic.") :]] = tensor
        return state

    @property
    def evaluations(self) -> dict[str, Any] | None:
        """The run's evaluation history up to the seed's steps (``evaluations.json``'s format), if it had one.

        A warm start writes it as the new run's ``evaluations.json``, so that the run's learning curve continues
        across the loss of its machine.
        """
        history = self.config.get("evaluations")
        return history if isinstance(history, dict) and history.get("timesteps") else None

    @property
    def matrix_precision(self) -> str:
        """``"float16"`` when the weight matrices are stored in float16, else ``"float32"``."""
        return str(self.config.get("matrix_precision", "float32"))

    def with_matrices_in_float16(self) -> ResumeSeed:
        """The same seed with every float32 tensor of two or more dimensions in float16 (half the file).

        Vectors and scalars (biases, D2R's routing temperatures, ``log alpha``) stay as they are.

        :raises ValueError: if a matrix holds a value beyond float16's range (+-65504), which would become
            infinite; such a seed must stay in float32.
        """
        tensors: dict[str, th.Tensor] = {}
        for name, tensor in self.tensors.items():
            if tensor.dtype == th.float32 and tensor.dim() >= 2:
                largest = float(tensor.abs().max()) if tensor.numel() else 0.0
                if largest > _FLOAT16_MAX:
                    raise ValueError(
                        f"{name!r} holds {largest:.4g}, beyond float16's range (+-{_FLOAT16_MAX:g}); write this seed "
                        "in float32 (--seed-precision float32)."
                    )
                tensor = tensor.to(th.float16)
            tensors[name] = tensor
        return ResumeSeed(
            tensors, self.log_ent_coef, {**self.config, "matrix_precision": "float16"}, self.path
        )

    def without_critic_target(self) -> ResumeSeed:
        """The same seed without the target networks (smaller; a warm start then copies the critics)."""
        tensors = {k: v for k, v in self.tensors.items() if not k.startswith("critic_target.")}
        return ResumeSeed(tensors, self.log_ent_coef, dict(self.config), self.path)


# --- from a model --------------------------------------------------------------------------------------
def seed_from_model(
    model: MultiTaskSAC,
    *,
    algo: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    source: str | None = None,
) -> ResumeSeed:
    """The resume seed of a model: copies of its policy's tensors and ``log alpha``, and its counters.

    :param model: a :class:`~d2r_sb3.MultiTaskSAC` / :class:`~d2r_sb3.D2RSAC` (trained or not).
    :param algo: registry name of the algorithm; inferred from the classes when ``None``.
    :param env_kwargs: ``make_mt_env`` keyword arguments of its env; default ``model.env.env_kwargs()`` when the
        model has such an env, else none.
    :param source: where the model came from (recorded in the seed).
    :return: the :class:`ResumeSeed`.
    :raises ValueError: if a tensor is not finite, or the policy class has no registered alias.
    """
    policy = model.policy
    algo = algo or infer_algo(model, policy)
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in policy.state_dict().items()}
    log_ent_coef = None
    if model.ent_coef_optimizer is not None:
        log_ent_coef = model._learned_log_ent_coef().detach().cpu().contiguous().clone()
    broken = first_nonfinite_tensor(
        [*tensors.items(), *([(LOG_ENT_COEF, log_ent_coef)] if log_ent_coef is not None else [])]
    )
    if broken is not None:
        raise ValueError(
            f"The model's {broken} holds NaN or infinite values; a seed of broken weights would be useless. Use a "
            "checkpoint from before training diverged."
        )
    if env_kwargs is None:
        env_kwargs_fn = getattr(getattr(model, "env", None), "env_kwargs", None)
        env_kwargs = env_kwargs_fn() if callable(env_kwargs_fn) else {}
    num_tasks = int(policy.num_tasks)
    config: dict[str, Any] = {
        "format_version": SEED_FORMAT_VERSION,
        "library": "d2r_sb3",
        "library_version": versions()["d2r_sb3"],
        "algo": algo,
        "algo_class": type(model).__name__,
        "policy_class": _policy_alias(policy, algo),
        "policy_kwargs": policy_kwargs(policy),
        "observation_space": encode_box(policy.observation_space, "observation"),
        "action_space": encode_box(policy.action_space, "action"),
        "num_tasks": num_tasks,
        "task_names": list(getattr(model, "task_names", None) or [f"task{i}" for i in range(num_tasks)]),
        "env_kwargs": {k: encode_kwarg(f"env_kwargs.{k}", v) for k, v in env_kwargs.items()},
        "num_timesteps": int(model.num_timesteps),
        "n_updates": int(model._n_updates),
        "ent_coef": model.ent_coef if isinstance(model.ent_coef, str) else float(model.ent_coef),
        "per_task_ent_coef": bool(getattr(model, "per_task_ent_coef", True)),
        "source": source,
        "versions": versions(),
    }
    return ResumeSeed(tensors, log_ent_coef, config)


# --- the file ------------------------------------------------------------------------------------------
def write_seed(seed: ResumeSeed, path: str | Path) -> Path:
    """Write a seed file (safetensors with its JSON description), atomically: readers see all of it or none.

    :param seed: the seed (:func:`seed_from_model`).
    :param path: the file; its folder is created; an existing file is replaced.
    :return: the path.
    :raises ValueError: if the description is not plain JSON.
    """
    path = Path(path)
    tensors = dict(seed.tensors)
    if seed.log_ent_coef is not None:
        tensors[LOG_ENT_COEF] = seed.log_ent_coef
    try:
        description = json.dumps(seed.config, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"The seed's description must be plain JSON: {error}") from error
    data = save(tensors, metadata={"format": "pt", SEED_METADATA_KEY: description})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    return path


def _seed_description(path: Path) -> dict[str, Any] | None:
    """The seed description in a safetensors file's metadata, ``None`` when it has none.

    :raises ValueError: if the file is not a valid safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a valid safetensors file ({error}).") from error
    text = metadata.get(SEED_METADATA_KEY)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: the seed description is not valid JSON ({error}).") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the seed description must be a JSON object.")
    return config


def is_seed_file(path: str | Path) -> bool:
    """Whether ``path`` is a file holding a resume seed (a safetensors file with the seed description)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return _seed_description(path) is not None
    except ValueError:
        return False


def read_seed(path: str | Path) -> ResumeSeed:
    """Read a seed file written by :func:`write_seed` (nothing is unpickled).

    :param path: the file.
    :return: the :class:`ResumeSeed` (tensors on the CPU).
    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: if it is not a seed (another safetensors file, a damaged file), has another format
        version, lacks entries, or holds non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (write a seed with {_WRITE_SEED}).")
    config = _seed_description(path)
    if config is None:
        raise ValueError(
            f"{path} is a safetensors file but not a resume seed (its metadata has no {SEED_METADATA_KEY}); a safe "
            f"policy folder's policy.safetensors holds the actor only. Write a seed with {_WRITE_SEED}."
        )
    if config.get("format_version") != SEED_FORMAT_VERSION:
        raise ValueError(
            f"{path} is a seed of format version {config.get('format_version')!r}; this d2r_sb3 reads version "
            f"{SEED_FORMAT_VERSION} (written by d2r_sb3 {config.get('library_version')!r})."
        )
    missing = [key for key in _REQUIRED_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path}: the seed description lacks {missing}; write the seed again.")
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{path} is damaged ({error}); write the seed again.") from error
    broken = first_nonfinite_tensor(tensors.items())
    if broken is not None:
        raise ValueError(f"{path}: the tensor {broken!r} holds NaN or infinite values.")
    log_ent_coef = tensors.pop(LOG_ENT_COEF, None)
    for part in ("actor", "critic"):
        if not any(name.startswith(part + ".") for name in tensors):
            raise ValueError(f"{path} holds no {part} tensors ({part}.*): not a complete seed.")
    return ResumeSeed(tensors, log_ent_coef, config, path)


# --- into a model --------------------------------------------------------------------------------------
def _kwargs_differences(seed: ResumeSeed, model: MultiTaskSAC) -> str:
    """``" (policy_kwargs that differ: n_modules 4 in the seed, 16 here)"``, or ``""``."""
    mine = policy_kwargs(model.policy)
    theirs = seed.config.get("policy_kwargs") or {}
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not keys:
        return ""
    shown = "; ".join(f"{k} {theirs.get(k)!r} in the seed, {mine.get(k)!r} here" for k in keys)
    return f" (policy_kwargs that differ: {shown})"


def _check_tensors(seed: ResumeSeed, model: MultiTaskSAC) -> None:
    expected = model.policy.state_dict()
    given = seed.policy_state_dict()
    hint = _kwargs_differences(seed, model)
    fix = "Build the run with the seed's network (the same --hyperparams policy_kwargs and the same tasks)."
    for name, tensor in expected.items():
        if name not in given:
            raise SeedMismatchError(
                f"the seed has no tensor {name!r}, which this run's {type(model.policy).__name__} has{hint}. {fix}",
                name,
            )
        if tuple(given[name].shape) != tuple(tensor.shape):
            raise SeedMismatchError(
                f"{name!r} has shape {list(given[name].shape)} in the seed but {list(tensor.shape)} in this run's "
                f"model{hint}. {fix}",
                name,
            )
    extra = sorted(set(given) - set(expected))
    if extra:
        raise SeedMismatchError(
            f"the seed has a tensor {extra[0]!r} that this run's {type(model.policy).__name__} does not have{hint}. "
            f"{fix}",
            extra[0],
        )


def _check_log_ent_coef(seed: ResumeSeed, model: MultiTaskSAC) -> None:
    learned = model.ent_coef_optimizer is not None
    if learned and seed.log_ent_coef is None:
        raise SeedMismatchError(
            f"this run learns its entropy coefficient (ent_coef={model.ent_coef!r}) but the seed's was fixed "
            f"(ent_coef={seed.config.get('ent_coef')!r}): there is no log alpha to load. Pass the seed's "
            "ent_coef (--hyperparams ent_coef:VALUE).",
            LOG_ENT_COEF,
        )
    if not learned and seed.log_ent_coef is not None:
        raise SeedMismatchError(
            f"the seed holds a learned log alpha but this run's ent_coef is fixed ({model.ent_coef!r}). Learn it "
            "(--hyperparams ent_coef:auto) to continue from the seed's.",
            LOG_ENT_COEF,
        )
    if learned and seed.log_ent_coef is not None:
        shape, mine = list(seed.log_ent_coef.shape), list(model._learned_log_ent_coef().shape)
        if shape != mine:
            raise SeedMismatchError(
                f"'log_ent_coef' has shape {shape} in the seed but {mine} in this run's model (one coefficient "
                "per task or one shared: per_task_ent_coef must match the seed's, "
                f"{seed.config.get('per_task_ent_coef')!r}).",
                LOG_ENT_COEF,
            )


def check_seed_fits(model: MultiTaskSAC, seed: ResumeSeed) -> None:
    """Check that ``seed`` can be loaded into ``model``: same algorithm, policy class and tensor shapes.

    :raises SeedMismatchError: naming the first entry that differs (``algo``, ``policy_class``, a tensor name,
        ``log_ent_coef``).
    """
    algo = infer_algo(model, model.policy)
    if seed.algo is not None and algo is not None and seed.algo != algo:
        raise SeedMismatchError(
            f"the seed is of algo {seed.algo!r}, this run is {algo!r}: pass --algo {seed.algo}.", "algo"
        )
    alias = _policy_alias(model.policy, algo)
    if seed.policy_class != alias:
        raise SeedMismatchError(
            f"the seed's policy class is {seed.policy_class!r}, this run's is {alias!r}: use the seed's policy "
            f"(--hyperparams policy:{seed.policy_class}).",
            "policy_class",
        )
    _check_tensors(seed, model)
    _check_log_ent_coef(seed, model)


def warm_start(model: MultiTaskSAC, seed: ResumeSeed) -> None:
    """Load a seed into a freshly built model, so that ``learn`` continues the seed's run with new moments.

    * the actor, the twin critics and their targets (the critics when the seed has no targets), and so D2R's
      routing temperatures (buffers of those networks), and the learned ``log alpha``, exactly (a float16 seed's
      matrices as float16 rounded them, converted to the model's dtype);
    * the optimisers' moments are cleared (fresh Adam state);
    * ``num_timesteps`` and the update count start at the seed's, so logs and schedules continue its curve:
      call ``learn(total - model.num_timesteps, reset_num_timesteps=False)``;
    * ``learning_starts`` is moved past the seed's steps (``seed steps + learning_starts``): the empty replay
      buffer is refilled for ``learning_starts`` env steps before the first update, by the loaded policy when
      ``policy_warmup`` is on (the default), by uniform actions otherwise.

    :param model: a freshly built model with the seed's algorithm and network (its replay buffer is not touched).
    :param seed: the seed (:func:`read_seed`, :func:`seed_from_model`).
    :raises SeedMismatchError: if the seed does not fit (nothing is changed then).
    """
    check_seed_fits(model, seed)
    with th.no_grad():
        model.policy.load_state_dict(seed.policy_state_dict(), strict=True)
        if seed.log_ent_coef is not None:
            log_ent_coef = model._learned_log_ent_coef()
            log_ent_coef.copy_(seed.log_ent_coef.to(log_ent_coef.device))
    optimizers = [model.actor.optimizer, model.critic.optimizer]
    if model.ent_coef_optimizer is not None:
        optimizers.append(model.ent_coef_optimizer)
    for optimizer in optimizers:
        optimizer.state.clear()
    model.num_timesteps = seed.num_timesteps
    model._n_updates = seed.n_updates
    model.learning_starts = seed.num_timesteps + model.learning_starts
