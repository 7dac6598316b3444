"""Evaluate a multi-task policy on every task: per-task success table (Markdown) and an optional JSON file.

The command lives in :mod:`d2r_sb3.zoo.evaluate` (also installed as ``d2r-evaluate``); run ``python zoo/evaluate.py --help``.
"""

from d2r_sb3.zoo.evaluate import cli

if __name__ == "__main__":
    cli()
