"""Learning curves of zoo runs from their ``evaluations.json``: success vs env steps, shaded across seeds.

The command lives in :mod:`d2r_sb3.zoo.plot` (also installed as ``d2r-plot``); run ``python zoo/plot.py --help``.
"""

from d2r_sb3.zoo.plot import cli

if __name__ == "__main__":
    cli()
