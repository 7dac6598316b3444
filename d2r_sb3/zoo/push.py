"""Publish a trained run on the Hugging Face Hub: stage the repo folder, then upload it.

The staged folder mirrors rl-baselines3-zoo's Hub layout plus the safe weights (see
:mod:`d2r_sb3.publishing`): ``<algo>-<EnvName>.zip``, ``config.yml``, ``env_kwargs.yml``, ``results.json``,
``policy.safetensors`` + ``policy.json``, ``replay.mp4``, ``learning_curve.png`` and the ``README.md`` model card.

Examples, from the repository root::

    # look at what would be published (nothing is uploaded)
    python hub/push.py --model logs/d2r/MT10-rand_1 --repo-id me/d2r-MT10-rand --dry-run --stage-dir /tmp/stage
    # publish (needs a token with write access: `hf auth login` or HF_TOKEN)
    python hub/push.py --model logs/d2r/MT10-rand_1 --repo-id me/d2r-MT10-rand

Without ``--repo-id`` the repo is ``<owner>/<algo>-<EnvName>``, the owner being ``--org`` or else the logged-in
Hugging Face user (``huggingface_hub.whoami()``); when that user cannot be found (no token, offline) ``--repo-id``
is required. A run is never staged under the official ``d2r-sb3`` ids unless asked for explicitly. The model zip is
a pickle: publish only runs you trained yourself.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

from d2r_sb3.hub import DEFAULT_ORG
from d2r_sb3.publishing import add_staging_arguments, push_to_hub, read_run, stage_repo, staging_options
from d2r_sb3.registry import ALGOS


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Stage a trained run as a Hugging Face Hub repo and upload it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_staging_arguments(parser, replay_file="replay.mp4")
    parser.add_argument(
        "--repo-id",
        default=None,
        help="Hub repo id, e.g. me/d2r-MT10-rand (default: <org>/<algo>-<EnvName>; required when the "
        "logged-in user is unknown)",
    )
    parser.add_argument(
        "--org",
        default=None,
        help="Owner (user or organisation) of the default repo id (default: the logged-in user)",
    )
    parser.add_argument("--algo", default=None, choices=list(ALGOS), help="Algorithm (default: from the run)")
    parser.add_argument(
        "--stage-dir", default=None, help="Where to stage the files (default: a new temporary folder)"
    )
    parser.add_argument("--overwrite", action="store_true", help="Empty a non-empty --stage-dir first")
    parser.add_argument("--dry-run", action="store_true", help="Stage only: list the files, upload nothing")
    parser.add_argument("--private", action="store_true", help="Create the repo as private")
    parser.add_argument(
        "--token", default=None, help="Hugging Face token (default: HF_TOKEN or `hf auth login`)"
    )
    parser.add_argument("--revision", default=None, help="Branch to commit to (default: main)")
    parser.add_argument("-m", "--commit-message", default=None, help="Commit message")
    return parser


def logged_in_user(token: str | None = None) -> str:
    """Name of the Hugging Face user of ``token`` (or of the saved login), the owner of the default repo id.

    :raises ValueError: when it cannot be found (offline, no token, the Hub unreachable): pass ``--repo-id``.
    """
    from huggingface_hub import constants, get_token, whoami

    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE=1 is set"
    elif not (token or get_token()):
        reason = "No Hugging Face token found (`hf auth login`, HF_TOKEN or --token)"
    else:
        try:
            return str(whoami(token=token)["name"])
        except Exception as error:  # network, authentication: any failure means "unknown"
            reason = f"huggingface_hub.whoami() failed: {' '.join(str(error).split())[:300]}"
    raise ValueError(
        f"--repo-id is required: without it the repo is named after the logged-in Hugging Face user, who is "
        f"unknown here ({reason}). Pass --repo-id <your user or organisation>/<name>, e.g. --repo-id "
        "me/d2r-MT10-rand (or --org <owner> for <owner>/<algo>-<EnvName>)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on a user error, printed without a traceback)."""
    args = build_parser().parse_args(argv)
    try:
        read_run(args.model, load_best=args.load_best)  # a missing run is the first error to report
        org = None if args.repo_id else args.org or logged_in_user(args.token)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if org is not None and not args.org:
        print(f"Repo owner: {org} (the logged-in Hugging Face user; --repo-id or --org choose another)")
    stage_dir = args.stage_dir or tempfile.mkdtemp(prefix="d2r-hub-")
    try:
        staged = stage_repo(
            args.model,
            stage_dir,
            repo_id=args.repo_id,
            org=DEFAULT_ORG if org is None else org,  # unused when repo_id is given
            algo=args.algo,
            video=None if args.no_video else "mp4",
            overwrite=args.overwrite,
            **staging_options(args),
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(staged.describe())
    if args.dry_run:
        print(f"Dry run: nothing uploaded. Inspect {staged.folder}, then run again without --dry-run.")
        return 0
    try:
        info = push_to_hub(
            staged.folder,
            staged.repo_id,
            token=args.token,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except (OSError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Uploaded to https://huggingface.co/{staged.repo_id} ({getattr(info, 'commit_url', info)})")
    return 0


def cli() -> None:
    """The ``d2r-push`` console command (and ``python hub/push.py``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
