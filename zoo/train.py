"""Train a multi-task agent on Meta-World MT10 / MT50 (an rl-baselines3-zoo style CLI).

The command lives in :mod:`d2r_sb3.zoo.train` (also installed as ``d2r-train``); run ``python zoo/train.py --help``.
"""

from d2r_sb3.zoo.train import cli

if __name__ == "__main__":
    cli()
