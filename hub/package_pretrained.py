"""Package a trained run as the pretrained policy bundled with d2r_sb3 (offline Hub-cache layout).

Writes the policy-only files of the run (``policy.safetensors``, ``policy.json``, ``results.json``,
``config.yml``, ``env_kwargs.yml``, ``learning_curve.png``, a small ``replay.gif`` and the ``README.md`` model card,
a few MB at most) into ``<out>/models--<org>--<name>/{refs/main, snapshots/<commit>/}``, the layout of the Hugging
Face cache, so that ``d2r_sb3.hub.load_from_hub("d2r-sb3/d2r-MT10-rand")`` finds it without network access. The
card and results are built by the same code as ``hub/push.py``.

Example, from the repository root::

    python hub/package_pretrained.py --model logs/d2r/MT10-rand_1 --repo-id d2r-sb3/d2r-MT10-rand
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from d2r_sb3.hub import DEFAULT_REPO_ID, PRETRAINED_CACHE
from d2r_sb3.publishing import add_staging_arguments, package_pretrained, staging_options


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Write a run's safe policy files into the bundled pretrained folder (Hub-cache layout).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_staging_arguments(parser, replay_file="replay.gif")
    parser.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="Hub repo id the bundle answers to")
    parser.add_argument("--out", default=str(PRETRAINED_CACHE), help="Cache folder to write into")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 on a user error, printed without a traceback)."""
    args = build_parser().parse_args(argv)
    try:
        snapshot = package_pretrained(
            args.model,
            args.out,
            repo_id=args.repo_id,
            video=not args.no_video,
            **staging_options(args),
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in snapshot.iterdir())
    print(f"Bundled {args.repo_id} in {snapshot} ({size / 2**20:.2f} MiB):")
    for path in sorted(snapshot.iterdir()):
        print(f"  {path.name:<22} {path.stat().st_size / 1024:>9.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
