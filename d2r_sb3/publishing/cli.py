"""Command-line flags shared by ``hub/push.py`` and ``hub/package_pretrained.py``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_staging_arguments", "staging_options"]


def add_staging_arguments(parser: argparse.ArgumentParser, *, replay_file: str) -> None:
    """Add the flags that choose the model, how it is evaluated and rendered, and the card's notes.

    :param parser: the script's parser.
    :param replay_file: name of the replay the script writes (``replay.mp4``, ``replay.gif``), for the help.
    """
    parser.add_argument(
        "--model", required=True, help="Zoo run folder logs/<algo>/<EnvName>_<N> (or one of its zips)"
    )
    parser.add_argument(
        "--load-best", action="store_true", help="Use best_model.zip instead of the final model"
    )
    parser.add_argument("--no-video", action="store_true", help=f"Do not render {replay_file}")
    parser.add_argument(
        "--video-steps", type=int, default=None, help="Env steps in the replay (default: one episode)"
    )
    parser.add_argument(
        "--video-tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="Tasks shown side by side in the replay (default: the first three)",
    )
    parser.add_argument(
        "--n-eval-episodes", type=int, default=100, help="Episodes per task if the run has no results.json"
    )
    parser.add_argument("--device", default="cpu", help="PyTorch device for evaluation and rendering")
    parser.add_argument(
        "--notes",
        default=None,
        metavar="FILE",
        help="Markdown file for the model card's 'About this run' section (e.g. how the run differs from the paper)",
    )


def staging_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`stage_repo` / :func:`package_pretrained` keyword arguments set by :func:`add_staging_arguments`.

    ``video`` is left to the caller (its type differs between the two). Reading ``--notes`` may raise ``OSError``.
    """
    return {
        "load_best": args.load_best,
        "video_steps": args.video_steps,
        "video_tasks": args.video_tasks or 3,
        "n_eval_episodes": args.n_eval_episodes,
        "device": args.device,
        "notes": Path(args.notes).read_text() if args.notes else None,
    }
