"""Helpers shared by the zoo scripts: ``key:value`` options, hyperparameter files, log folders, run records.

The conventions follow rl-baselines3-zoo so that its users feel at home:

* ``d2r_sb3/zoo/hyperparams/<algo>.yml`` holds one section per ``<benchmark>-<preset>`` (``MT10-paper``, ``MT50-mw3``,
  ...) plus an optional ``default``; a section maps the algorithm's constructor arguments, ``n_timesteps`` and
  ``policy`` (the alias). Unlike rl-zoo, ``policy_kwargs`` is a YAML mapping, never a string to ``eval``.
* A run writes ``logs/<algo>/<EnvName>_<N>/`` (:class:`~d2r_sb3.common.run_layout.RunLayout`), ``EnvName`` =
  :func:`env_name`.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from d2r_sb3.common.devices import device_unavailable_reason
from d2r_sb3.common.files import atomic_write_bytes, to_plain

ZOO_DIR = Path(__file__).resolve().parent
HYPERPARAMS_DIR = ZOO_DIR / "hyperparams"
DEFAULT_LOG_FOLDER = "logs"
DEFAULT_MODEL = "d2r-sb3/d2r-MT10-rand"
"""Hub id of the pretrained policy shipped with the package (loads offline from the bundled copy)."""

# Constructor arguments that must be integers (YAML reads ``1e6`` or ``!!float 1e6`` as a float).
INT_HYPERPARAMS = (
    "n_timesteps",
    "buffer_size",
    "learning_starts",
    "batch_size",
    "gradient_steps",
    "target_update_interval",
    "stats_window_size",
)
_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ZooError(Exception):
    """An expected problem (bad option, missing file, ...): the scripts print it without a traceback."""


def call_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main`` and return its exit code: :class:`ZooError` prints ``error: <message>`` to stderr
    and gives 2, Ctrl-C gives 130.

    :param main: The command's entry point; returns the exit code (``None`` = 0).
    :param argv: Command-line arguments (default: ``sys.argv[1:]``).
    """
    try:
        code = main(argv)
    except ZooError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    return code or 0


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a command's ``main`` as a program: :func:`call_main`, then exit with its code."""
    sys.exit(call_main(main, argv))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with the defaults shown, except empty ones (None, False) and those the help text already gives."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Destinations of the options actually given on the command line (not filled in from defaults).

    Used by ``train.py --resume`` to tell "the user asked for this" from "this is the default".
    """
    defaults = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given = parser.parse_args(argv)
    finally:
        for action in parser._actions:
            action.default = defaults[action.dest]
    return set(vars(given))


# --------------------------------------------------------------------------------------------------
# key:value options and hyperparameters
# --------------------------------------------------------------------------------------------------
def coerce_numbers(value: Any) -> Any:
    """Read number-looking strings as floats, recursively (YAML 1.1 reads ``3e-4``, without a dot, as a string)."""
    if isinstance(value, str):
        text = value.strip()
        if _NUMBER_RE.match(text):
            return float(text)
        return None if text == "None" else value
    if isinstance(value, dict):
        return {key: coerce_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(item) for item in value]
    return value


def parse_value(text: str) -> Any:
    """Parse one option value as YAML (``256``, ``3e-4``, ``true``, ``"{n_modules: 4}"``, ``[32, 32]``).

    :raises ZooError: If the text is not valid YAML.
    """
    try:
        return coerce_numbers(yaml.safe_load(text))
    except yaml.YAMLError as err:
        raise ZooError(f"Cannot parse the value {text!r} as YAML: {err}") from None


def parse_key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """Parse ``key:value`` pairs (values are YAML, split at the first colon).

    :param items: The pairs, e.g. ``["batch_size:256", "policy_kwargs:{n_modules: 4}"]``.
    :param option: The option's name, for error messages.
    :raises ZooError: If an item has no colon or an empty key.
    """
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, colon, raw = item.partition(":")
        if not colon or not key.strip():
            raise ZooError(
                f"{option} expects key:value pairs, got {item!r} "
                f'(e.g. {option} batch_size:256 policy_kwargs:"{{n_modules: 4}}")'
            )
        parsed[key.strip()] = parse_value(raw)
    return parsed


def available_hyperparams(folder: Path = HYPERPARAMS_DIR) -> list[str]:
    """Names of the algorithms with a hyperparameter file in ``folder``."""
    return sorted(p.stem for p in folder.glob("*.yml"))


def load_hyperparams(
    algo: str, benchmark: str, preset: str, conf_file: str | Path | None = None
) -> tuple[dict[str, Any], str]:
    """Hyperparameters of ``algo`` for a benchmark and preset.

    The file is ``zoo/hyperparams/<algo>.yml`` (or ``conf_file``); its section ``<benchmark>-<preset>`` is
    used, else its ``default`` section. A file without sections (a flat mapping such as a run's
    ``config.yml``) is used as a whole.

    :param algo: Registry name (``"d2r"``).
    :param benchmark: ``"MT10"``, ``"MT50"`` or ``"custom"``.
    :param preset: Env preset (``"paper"``, ``"mw3"``).
    :param conf_file: Another YAML file to read instead.
    :return: ``(hyperparameters, source)``, with source ``"<file>:<section>"``.
    :raises ZooError: Missing file or section (the message lists what exists).
    """
    path = Path(conf_file) if conf_file is not None else HYPERPARAMS_DIR / f"{algo}.yml"
    if not path.is_file():
        if conf_file is not None:
            raise ZooError(f"Hyperparameter file {path} not found.")
        have = ", ".join(available_hyperparams()) or "none"
        raise ZooError(
            f"No hyperparameter file for algo {algo!r}: {path} does not exist (algos with a file: {have}). "
            f"Write one (sections like 'MT10-paper', see d2r_sb3/zoo/hyperparams/d2r.yml) or pass -conf FILE."
        )
    data = read_yaml_mapping(path, str(path), "of sections ('MT10-paper: {...}')")
    if data and not all(isinstance(section, dict) for section in data.values()):
        return coerce_numbers(copy.deepcopy(data)), str(path)  # a flat config (e.g. a run's config.yml)
    key = f"{benchmark}-{preset}"
    for section in (key, "default"):
        if section in data:
            return coerce_numbers(copy.deepcopy(data[section])), f"{path}:{section}"
    raise ZooError(
        f"{path} has no section {key!r} and no 'default' section (sections: {', '.join(map(str, data)) or 'none'})."
    )


def read_yaml_mapping(path: Path, label: str, layout: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping), with clear errors.

    :param path: the file.
    :param label: how the messages name it, e.g. ``"Grid file sweeps/grid.yml"``.
    :param layout: what the mapping looks like, for the message, e.g. ``"(algos: [...], envs: [...], ...)"``.
    :raises ZooError: when the file is not valid YAML or holds something other than a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ZooError(f"{label} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ZooError(f"{label} must hold a mapping {layout}, got {type(data).__name__}.")
    return data


def apply_overrides(hyperparams: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``hyperparams`` updated with ``overrides``; mapping values (``policy_kwargs``) are merged key by key."""
    merged = copy.deepcopy(hyperparams)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def normalize_hyperparams(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """Cast integral floats of integer arguments to int and a ``train_freq`` list to a tuple (SB3 needs both).

    :raises ZooError: If an integer argument has a fractional value.
    """
    result = dict(hyperparams)
    for key in INT_HYPERPARAMS:
        value = result.get(key)
        if isinstance(value, float):
            if not value.is_integer():
                raise ZooError(f"Hyperparameter {key} must be an integer, got {value}.")
            result[key] = int(value)
    if isinstance(result.get("train_freq"), list):
        result["train_freq"] = tuple(result["train_freq"])
    return result


# --------------------------------------------------------------------------------------------------
# Env names and log folders
# --------------------------------------------------------------------------------------------------
def env_name(benchmark: str, goals: str, preset: str) -> str:
    """Run / hub name of an env: ``"MT10-rand"`` for the paper preset, ``"MT10-rand-mw3"`` otherwise."""
    name = f"{benchmark}-{goals}"
    return name if preset == "paper" else f"{name}-{preset}"


def parse_env(text: str) -> str | list[str]:
    """``--env`` value: ``"MT10"``/``"MT50"`` or comma-separated task names (a custom benchmark).

    :raises ZooError: On an unknown benchmark or task (the message lists the valid names).
    """
    from d2r_sb3.envs import benchmark_task_names

    value: str | list[str] = text.upper() if text.upper() in ("MT10", "MT50") else text
    if isinstance(value, str) and "," in value:
        value = [name.strip() for name in value.split(",") if name.strip()]
    try:
        benchmark_task_names(value)
    except ValueError as err:
        raise ZooError(str(err)) from None
    return value


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
def write_yaml(path: Path, data: Any) -> None:
    """Write ``data`` (made plain with :func:`to_plain`) as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_plain(data), sort_keys=False, default_flow_style=None))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (a reader never sees a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(to_plain(data), indent=2) + "\n").encode())


def read_yaml(path: Path) -> Any:
    """Read a YAML file written by :func:`write_yaml`."""
    return yaml.safe_load(path.read_text())


def set_num_threads(num_threads: int) -> None:
    """``torch.set_num_threads`` when ``num_threads > 0`` (otherwise torch's default)."""
    if num_threads > 0:
        import torch as th

        th.set_num_threads(num_threads)


# --------------------------------------------------------------------------------------------------
# Loading models (enjoy / evaluate)
# --------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick and load a model, shared by ``enjoy.py`` and ``evaluate.py``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument(
        "--load-best", action="store_true", help="For a zoo run folder: load the best model (best_policy/)"
    )
    add_loading_arguments(parser)
    parser.add_argument(
        "--num-threads", type=int, default=-1, help="PyTorch CPU threads (-1: torch's default)"
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="Env seed (default: the seed of the model's training env)"
    )
    parser.add_argument("--goals", default=None, help="Goal mode (fixed, rand, mw3; default: the model's)")
    parser.add_argument(
        "--env-kwargs",
        nargs="+",
        metavar="KEY:VALUE",
        help="Other make_mt_env overrides (max_episode_steps:500)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stochastic", action="store_true", help="Sample actions (and D2R routes)")
    mode.add_argument(
        "--deterministic", action="store_true", help="Deterministic actions and routes (the default)"
    )


MODEL_HELP = (
    "Safe policy folder, zoo run folder (logs/<algo>/<EnvName>_<N>), SB3 .zip (needs --allow-pickle) or Hub repo "
    "id owner/name (hf://owner/name forces the Hub; ./owner/name forces a local path)"
)


def torch_device(text: str) -> str:
    """``--device`` value: ``auto`` or a device torch can use here; an unusable one is an argparse error (SB3
    would fall back to the CPU without a word)."""
    try:
        reason = device_unavailable_reason(text)
    except RuntimeError as err:
        problem = f"is not a torch device ({err})"
    else:
        if reason is None:
            return text
        problem = f"cannot be used: {reason}"
    raise argparse.ArgumentTypeError(
        f"{text!r} {problem}. Use --device auto (the GPU when torch sees one, else the CPU) or --device cpu"
    )


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--allow-pickle``, shared by ``enjoy.py``, ``evaluate.py`` and ``analyze.py``."""
    parser.add_argument(
        "--device",
        default="auto",
        type=torch_device,
        help="PyTorch device (auto: the GPU when torch sees one, else the CPU; cuda: the GPU, an error without one)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="Allow loading SB3 .zip files: they are pickles, and unpickling can run arbitrary code, so only for "
        "files you trust (your own runs). Safe policy files (policy.json + policy.safetensors) never need it",
    )


def load_model(model: str, load_best: bool = False, device: str = "auto", allow_pickle: bool = False) -> Any:
    """:func:`d2r_sb3.load_policy`, printing what was loaded, with a message that says how to get a model when
    none can be loaded.

    Prints ``Loaded <origin>`` (e.g. ``Loaded Hub repo d2r-sb3/d2r-MT10-rand (bundled snapshot)`` or ``Loaded
    local folder logs/d2r/MT10-rand_1/policy``) and the loader's warnings (``Warning: ...``, on stderr).

    :param model: Safe policy folder, zoo run folder, SB3 zip or Hub repo id (the rule of
        :func:`d2r_sb3.serialization.resolve_model`).
    :param load_best: Load the best model of a zoo run folder.
    :param device: Torch device.
    :param allow_pickle: Allow SB3 zips (unpickled: trusted files only).
    :return: The :class:`~d2r_sb3.serialization.LoadedPolicy`.
    :raises ZooError: If the model cannot be found or read, or needs ``--allow-pickle``.
    """
    import warnings

    from d2r_sb3.serialization import ModelNotFoundError, PickleNotAllowedError, load_policy

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_policy(model, device=device, load_best=load_best, allow_pickle=allow_pickle)
    except PickleNotAllowedError as err:
        raise ZooError(f"Refusing to load {model!r} without --allow-pickle: {err}") from None
    except (OSError, ValueError) as err:
        what = (
            f"The default pretrained policy {model!r} is neither bundled with this install nor downloadable now"
            if model == DEFAULT_MODEL
            else f"Cannot load the model {model!r}"
        )
        hints = [
            "  - train one:  python zoo/train.py --algo d2r --env MT10 --goals rand --seed 0",
            "                then pass --model logs/d2r/MT10-rand_1 (add --load-best for the best model);",
            f"  - or use a published policy: --model {DEFAULT_MODEL} (bundled with d2r_sb3)",
        ]
        if not isinstance(err, ModelNotFoundError):
            hints[-1] += "; other Hub repos are downloaded once (HF_HUB_OFFLINE unset)"
        raise ZooError(f"{what}: {err}\nTo get a model:\n" + "\n".join(hints)) from None
    for warning in caught:  # e.g. a local folder named like the Hub id that was not used
        if not issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning, ResourceWarning)):
            print(f"Warning: {warning.message}", file=sys.stderr)
    print(f"Loaded {loaded.origin}")
    return loaded


def model_env_kwargs(loaded: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """make_mt_env arguments of a loaded model's env, updated with the non-None values of ``overrides``.

    When the model carries no env settings (a bare ``.zip``), the benchmark is inferred from its task names and
    the make_mt_env defaults are used, with a warning.

    :raises ZooError: On an override that make_mt_env does not accept.
    """
    from d2r_sb3.envs import benchmark_task_names, check_env_kwargs

    kwargs = dict(loaded.env_kwargs)
    if "benchmark" not in kwargs:
        names = list(loaded.task_names)
        benchmark: str | list[str] = names
        for candidate in ("MT10", "MT50"):
            if benchmark_task_names(candidate) == names:
                benchmark = candidate
        print(
            f"Warning: no env settings were saved with {loaded.source}; using benchmark {benchmark!r} with "
            "make_mt_env's defaults (pass --goals / --env-kwargs to match the training env).",
            file=sys.stderr,
        )
        kwargs["benchmark"] = benchmark
    try:
        check_env_kwargs(overrides)
    except ValueError as err:
        raise ZooError(str(err)) from None
    kwargs.update({key: value for key, value in overrides.items() if value is not None})
    return kwargs
