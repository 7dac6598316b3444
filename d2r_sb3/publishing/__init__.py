"""Publish trained checkpoints: stage a Hub repo folder, upload it, or package the bundled pretrained policy.

One code path builds every published folder (:func:`stage_repo`); the command-line tools in ``hub/`` are thin
wrappers around it:

* ``python hub/push.py --model logs/d2r/MT10-rand_1 --repo-id ORG/d2r-MT10-rand`` stages the full repo
  (:func:`stage_repo`) and uploads it (:func:`push_to_hub`);
* ``python hub/package_pretrained.py --model logs/d2r/MT10-rand_1`` writes the policy-only files into the
  package's Hub-cache folder ``d2r_sb3/pretrained/`` (:func:`package_pretrained`), which
  :func:`d2r_sb3.hub.load_from_hub` reads offline.

A staged repo mirrors rl-baselines3-zoo's Hub layout plus the safe weights:

=========================  ====================================================================================
``<algo>-<EnvName>.zip``   the SB3 model (a pickle), to resume or fine-tune training
``config.yml``             hyperparameters of the run; ``args.yml`` (the CLI arguments) when present
``env_kwargs.yml``         :func:`~d2r_sb3.make_mt_env` keyword arguments
``results.json``           final per-task evaluation (the run's, or computed here with ``evaluate_per_task``)
``evaluations.json``       evaluation history during training, when present
``policy.safetensors``     actor weights + ``policy.json`` (safe policy format, :mod:`d2r_sb3.serialization`)
``replay.mp4``             a short clip of a few tasks (``replay.gif`` for the bundled package)
``learning_curve.png``     success rate vs env steps, from ``evaluations.json``
``README.md``              model card: metadata + model-index, per-task results next to published anchors
=========================  ====================================================================================

The modules, one job each: :mod:`~d2r_sb3.publishing.runs` (reading a run folder),
:mod:`~d2r_sb3.publishing.environment` (describing its env), :mod:`~d2r_sb3.publishing.media` (replay, learning
curve), :mod:`~d2r_sb3.publishing.card` (the model card, from ``templates/model_card.md``),
:mod:`~d2r_sb3.publishing.staging` (the pipeline that writes a repo folder), :mod:`~d2r_sb3.publishing.upload`,
:mod:`~d2r_sb3.publishing.bundle` (into ``d2r_sb3/pretrained``) and :mod:`~d2r_sb3.publishing.cli` (shared flags).

This package reads SB3 zips, which are pickles: stage only runs you trained yourself.
"""

from d2r_sb3.common.run_layout import EVALUATIONS_FILE, RESULTS_FILE
from d2r_sb3.publishing.bundle import BUNDLE_SIZE_WARNING, package_pretrained
from d2r_sb3.publishing.card import (
    ALGO_TITLES,
    ANCHORS,
    D2R_BIBTEX,
    MODEL_CARD_TEMPLATE,
    SB3_BIBTEX,
    build_model_card,
)
from d2r_sb3.publishing.cli import add_staging_arguments, staging_options
from d2r_sb3.publishing.media import CURVE_FILE, plot_learning_curve, record_replay
from d2r_sb3.publishing.runs import RECORD_FILES, Run, read_run, task_results
from d2r_sb3.publishing.staging import StagedRepo, stage_repo
from d2r_sb3.publishing.upload import push_to_hub

__all__ = [
    "ALGO_TITLES",
    "ANCHORS",
    "BUNDLE_SIZE_WARNING",
    "CURVE_FILE",
    "D2R_BIBTEX",
    "EVALUATIONS_FILE",
    "MODEL_CARD_TEMPLATE",
    "RECORD_FILES",
    "RESULTS_FILE",
    "SB3_BIBTEX",
    "Run",
    "StagedRepo",
    "add_staging_arguments",
    "build_model_card",
    "package_pretrained",
    "plot_learning_curve",
    "push_to_hub",
    "read_run",
    "record_replay",
    "stage_repo",
    "staging_options",
    "task_results",
]
