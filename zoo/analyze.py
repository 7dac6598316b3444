"""Routing analysis of a D2R model: modules used per task, routing DAGs and a t-SNE of routes (paper Figs. 6, 8).

The command lives in :mod:`d2r_sb3.zoo.analyze` (also installed as ``d2r-analyze``); run ``python zoo/analyze.py --help``.
"""

from d2r_sb3.zoo.analyze import cli

if __name__ == "__main__":
    cli()
