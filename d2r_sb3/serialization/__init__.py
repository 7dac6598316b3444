"""Save and load multi-task policies: a safe weights-only format and SB3 zips.

The **safe policy format** is a folder with ``policy.safetensors`` (the actor's weights) and ``policy.json``
(everything needed to rebuild the policy and its env, as plain JSON); loading it never unpickles anything.

:func:`load_policy` also reads SB3 ``.zip`` files, zoo run folders (``logs/<algo>/<EnvName>_<N>/``) and Hugging
Face Hub repo ids (through :func:`d2r_sb3.hub.download_policy`). SB3 zips are pickles, and unpickling can run
arbitrary code: :func:`load_policy` refuses them unless called with ``allow_pickle=True`` (the zoo scripts:
``--allow-pickle``). Zoo runs carry the safe files too (:func:`write_safe_policy`: ``<run>/policy/`` for the final
model, ``<run>/best_policy/`` for ``best_model.zip``), and those are what a run folder loads by default.
:func:`resolve_model` is the one rule that decides whether a name is a local path or a Hub repo id.

The modules, each importing only those above it in this list:

- :mod:`~d2r_sb3.serialization.loaded_policy`: :class:`LoadedPolicy`, what loading returns (with the
  :class:`RecordedEvaluation` of its ``results.json`` when there is one);
- :mod:`~d2r_sb3.serialization.json_codec`: spaces and constructor arguments as plain JSON;
- :mod:`~d2r_sb3.serialization.safe_format`: ``policy.safetensors`` + ``policy.json``, written and read;
- :mod:`~d2r_sb3.serialization.sb3_zip`: SB3 zips, read without unpickling, or unpickled on request;
- :mod:`~d2r_sb3.serialization.run_policies`: the safe files of a zoo run;
- :mod:`~d2r_sb3.serialization.seed`: resume seeds (actor, critics and their targets, log alpha, counters in one
  safetensors file) and the warm start of a new model from one;
- :mod:`~d2r_sb3.serialization.hub`: downloads from the Hugging Face Hub (no loading);
- :mod:`~d2r_sb3.serialization.loading`: :func:`resolve_model`, :func:`load_policy`, :func:`load_from_hub`.

This package only re-exports their public names; none of its modules imports it back.
"""

from d2r_sb3.common.run_layout import BEST_MODEL_ZIP, BEST_POLICY_DIR, POLICY_DIR
from d2r_sb3.serialization.loaded_policy import LoadedPolicy, RecordedEvaluation
from d2r_sb3.serialization.loading import (
    HUB_PREFIX,
    ModelLocation,
    ModelNotFoundError,
    load_from_hub,
    load_policy,
    resolve_model,
)
from d2r_sb3.serialization.run_policies import write_safe_policy
from d2r_sb3.serialization.safe_format import (
    FORMAT_VERSION,
    POLICY_CONFIG_FILE,
    POLICY_WEIGHTS_FILE,
    REQUIRED_KEYS,
    check_policy_folder,
    read_policy_config,
    save_policy,
)
from d2r_sb3.serialization.sb3_zip import ZIP_REQUIRED_KEYS, PickleNotAllowedError, find_model_zip
from d2r_sb3.serialization.seed import (
    SEED_PRECISIONS,
    ResumeSeed,
    SeedMismatchError,
    check_seed_fits,
    is_seed_file,
    read_seed,
    seed_from_model,
    warm_start,
    write_seed,
)

RUN_POLICY_DIR = POLICY_DIR
"""Subfolder of a zoo run holding the safe files of the final model (:data:`d2r_sb3.common.run_layout.POLICY_DIR`)."""
RUN_BEST_POLICY_DIR = BEST_POLICY_DIR
"""Subfolder of a zoo run holding the safe files of ``best_model.zip`` (``run_layout.BEST_POLICY_DIR``)."""

__all__ = [
    "BEST_MODEL_ZIP",
    "FORMAT_VERSION",
    "HUB_PREFIX",
    "POLICY_CONFIG_FILE",
    "POLICY_WEIGHTS_FILE",
    "REQUIRED_KEYS",
    "RUN_BEST_POLICY_DIR",
    "RUN_POLICY_DIR",
    "SEED_PRECISIONS",
    "ZIP_REQUIRED_KEYS",
    "LoadedPolicy",
    "ModelLocation",
    "ModelNotFoundError",
    "PickleNotAllowedError",
    "RecordedEvaluation",
    "ResumeSeed",
    "SeedMismatchError",
    "check_policy_folder",
    "check_seed_fits",
    "find_model_zip",
    "is_seed_file",
    "load_from_hub",
    "load_policy",
    "read_policy_config",
    "read_seed",
    "resolve_model",
    "save_policy",
    "seed_from_model",
    "warm_start",
    "write_safe_policy",
    "write_seed",
]
