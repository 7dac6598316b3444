"""Where a zoo run keeps its files: one object for the folder naming, the file names and the checkpoint pattern.

A run lives in ``<log folder>/<algo>/<EnvName>_<N>/`` (the rl-baselines3-zoo layout)::

    MT10-rand_1/
        MT10-rand/            config.yml, args.yml, env_kwargs.yml, command.txt (the run's records), and
                              warm_start.yml for a run started with --warm-start (what it started from)
        MT10-rand.zip         the final model (SB3 zip)
        best_model.zip        the best model by mean success
        policy/, best_policy/ the same policies in the safe format
        checkpoints/step_<N>/ training checkpoints (model, replay buffer, RNG and env state)
        evaluations.json      the periodic per-task evaluations
        results.json          the final evaluation
        replay_buffer.pkl     the final replay buffer in SB3's format (with --save-replay-buffer)
        progress.csv          the SB3 logger's table

Runs written by earlier versions kept their checkpoints as ``rl_model_<N>_steps.zip`` beside the final model;
:meth:`RunLayout.legacy_checkpoints` still finds them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ENV_KWARGS_FILE = "env_kwargs.yml"
"""The env's :func:`~d2r_sb3.make_mt_env` settings: a run record, and a file of every training checkpoint."""
RECORDS = ("config.yml", "args.yml", ENV_KWARGS_FILE, "command.txt", "warm_start.yml")
"""The run's records, kept in its ``<EnvName>/`` sub-folder (``warm_start.yml`` only for a run started with
``train.py --warm-start``: the file it loaded, its SHA-256, its steps and updates)."""
RESULTS_FILE = "results.json"
EVALUATIONS_FILE = "evaluations.json"
PROGRESS_FILE = "progress.csv"
BEST_MODEL_ZIP = "best_model.zip"
REPLAY_BUFFER_PICKLE = "replay_buffer.pkl"
"""The final replay buffer in SB3's format (``zoo/train.py --save-replay-buffer``)."""
POLICY_DIR = "policy"
BEST_POLICY_DIR = "best_policy"
CHECKPOINTS_DIR = "checkpoints"
LEGACY_CHECKPOINT = re.compile(r"^rl_model_(\d+)_steps\.zip$")
_RUN_NAME = re.compile(r"^(?P<name>.+)_(?P<id>\d+)$")


def split_run_name(folder_name: str) -> tuple[str, int] | None:
    """``"MT10-rand_3"`` -> ``("MT10-rand", 3)``; ``None`` when the name has no ``_<N>`` suffix."""
    match = _RUN_NAME.match(folder_name)
    return (match["name"], int(match["id"])) if match else None


def latest_run_id(folder: str | Path, env_name: str) -> int:
    """Largest ``N`` of the ``<env_name>_<N>`` folders in ``folder`` (0 if there is none)."""
    folder = Path(folder)
    ids = [0]
    if folder.is_dir():
        for path in folder.iterdir():
            parts = split_run_name(path.name)
            if path.is_dir() and parts is not None and parts[0] == env_name:
                ids.append(parts[1])
    return max(ids)


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder ``<log folder>/<algo>/<EnvName>_<N>``.

    :param run_dir: the run folder.
    :param env_name: the ``EnvName`` part of its name; read from the folder name when not given (a folder
        without the ``_<N>`` suffix, such as a staged Hub repository, uses its whole name).
    """

    run_dir: Path
    env_name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))
        if not self.env_name:
            parts = split_run_name(self.run_dir.name)
            object.__setattr__(self, "env_name", parts[0] if parts else self.run_dir.name)

    @classmethod
    def next_free(cls, log_folder: str | Path, algo: str, env_name: str) -> RunLayout:
        """The next unused ``<log_folder>/<algo>/<env_name>_<N>`` (N = latest + 1, as rl-baselines3-zoo does)."""
        folder = Path(log_folder) / algo
        return cls(folder / f"{env_name}_{latest_run_id(folder, env_name) + 1}", env_name)

    @property
    def is_numbered(self) -> bool:
        """Whether the folder name has the zoo's ``_<N>`` suffix."""
        return split_run_name(self.run_dir.name) is not None

    @property
    def records_dir(self) -> Path:
        """``<run>/<EnvName>/``: config.yml, args.yml, env_kwargs.yml, command.txt (and warm_start.yml)."""
        return self.run_dir / self.env_name

    def record(self, name: str) -> Path:
        """Path of one of the :data:`RECORDS`."""
        if name not in RECORDS:
            raise ValueError(f"{name!r} is not a run record; the records are: {', '.join(RECORDS)}.")
        return self.records_dir / name

    @property
    def final_model(self) -> Path:
        """``<run>/<EnvName>.zip``."""
        return self.run_dir / f"{self.env_name}.zip"

    @property
    def best_model(self) -> Path:
        return self.run_dir / BEST_MODEL_ZIP

    @property
    def policy_dir(self) -> Path:
        """The final policy in the safe format."""
        return self.run_dir / POLICY_DIR

    @property
    def best_policy_dir(self) -> Path:
        return self.run_dir / BEST_POLICY_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    @property
    def evaluations_file(self) -> Path:
        return self.run_dir / EVALUATIONS_FILE

    @property
    def results_file(self) -> Path:
        return self.run_dir / RESULTS_FILE

    @property
    def progress_file(self) -> Path:
        return self.run_dir / PROGRESS_FILE

    def legacy_checkpoints(self) -> list[tuple[int, Path]]:
        """``(env steps, path)`` of the ``rl_model_<N>_steps.zip`` checkpoints of earlier versions, oldest first."""
        found = []
        for path in self.run_dir.glob("rl_model_*_steps.zip"):
            match = LEGACY_CHECKPOINT.match(path.name)
            if match:
                found.append((int(match[1]), path))
        return sorted(found)

    @property
    def replay_buffer_pickle(self) -> Path:
        """The final replay buffer in SB3's format (``--save-replay-buffer``)."""
        return self.run_dir / REPLAY_BUFFER_PICKLE

    def legacy_buffer(self, steps: int) -> Path:
        """The replay buffer pickle an earlier version saved beside its ``rl_model_<steps>_steps.zip``."""
        return self.run_dir / f"rl_model_replay_buffer_{steps}_steps.pkl"
