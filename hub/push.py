"""Publish a trained run on the Hugging Face Hub: stage the repo folder, then upload it.

The command lives in :mod:`d2r_sb3.zoo.push` (also installed as ``d2r-push``); run ``python hub/push.py --help``.
"""

from d2r_sb3.zoo.push import cli

if __name__ == "__main__":
    cli()
