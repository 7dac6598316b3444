"""Reading a zoo run folder for publishing: its model zip, its records and its evaluations."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from d2r_sb3.common.run_layout import RECORDS, RESULTS_FILE, RunLayout, split_run_name
from d2r_sb3.serialization.sb3_zip import find_model_zip

__all__ = ["RECORD_FILES", "Run", "read_run", "task_results"]

RECORD_FILES = RECORDS
"""The run's records (config.yml, args.yml, env_kwargs.yml, command.txt, warm_start.yml):
:data:`~d2r_sb3.common.run_layout.RECORDS`."""


@dataclass
class Run:
    """What a zoo run folder ``logs/<algo>/<EnvName>_<N>/`` holds (contract 1 of the zoo).

    :param run_dir: the run folder.
    :param model_zip: the zip to publish.
    :param env_name: the ``EnvName`` of a numbered run folder (``None`` for any other folder).
    :param records: config.yml, args.yml, env_kwargs.yml and command.txt, where found.
    :param results: ``results.json`` (the final evaluation), if present.
    :param evaluations: ``evaluations.json`` (the evaluation history), if present.
    """

    run_dir: Path
    model_zip: Path
    env_name: str | None
    records: dict[str, Path] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    evaluations: dict[str, Any] | None = None

    @property
    def layout(self) -> RunLayout:
        """The run's paths; a folder that is not a numbered run keeps its records beside the zip's stem."""
        return RunLayout(self.run_dir, self.env_name or self.model_zip.stem)

    def read_yaml(self, name: str) -> dict[str, Any]:
        """A YAML record of the run as a mapping (empty if absent)."""
        path = self.records.get(name)
        if path is None:
            return {}
        data = yaml.safe_load(path.read_text())
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a YAML mapping, got {type(data).__name__}.")
        return data


def read_run(model: str | Path, *, load_best: bool = False) -> Run:
    """Locate the model zip and the records of a zoo run folder (or of a zip inside one).

    :param model: the run folder ``logs/<algo>/<EnvName>_<N>`` or one of its zips.
    :param load_best: publish ``best_model.zip`` instead of the final ``<EnvName>.zip``.
    :return: the :class:`Run`.
    :raises FileNotFoundError: if there is no model zip.
    """
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".zip":
        run_dir, model_zip = path.parent, path
    elif path.is_dir():
        run_dir = path
        found = find_model_zip(path, load_best)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds no model zip: pass a zoo run folder logs/<algo>/<EnvName>_<N>."
            )
        model_zip = found
    else:
        raise FileNotFoundError(
            f"{path} does not exist: pass a zoo run folder logs/<algo>/<EnvName>_<N> or a .zip."
        )
    parts = split_run_name(run_dir.name)
    run = Run(run_dir, model_zip, parts[0] if parts else None)
    layout = run.layout
    for name in RECORDS:  # the zoo keeps them in <EnvName>/; a staged repo beside the zip
        for folder in (layout.records_dir, run_dir):
            if (folder / name).is_file():
                run.records[name] = folder / name
                break
    run.results = _read_json(layout.results_file)
    run.evaluations = _read_json(layout.evaluations_file)
    return run


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    return data


def task_results(results: dict[str, Any], where: str = RESULTS_FILE) -> dict[str, Any]:
    """The per-task evaluation inside a results record (``TaskEvaluation.to_dict()`` keys).

    Accepts the keys at the top level or under ``"evaluation"`` / ``"final"``.

    :raises ValueError: if no per-task ``success`` mapping is found.
    """
    for candidate in (results, results.get("evaluation"), results.get("final")):
        if isinstance(candidate, dict) and isinstance(candidate.get("success"), dict):
            return candidate
    raise ValueError(
        f"{where} has no per-task success: expected the keys of TaskEvaluation.to_dict() (success: {{task: rate}}, "
        "mean_return, std_return, episodes), at the top level or under 'evaluation'."
    )
