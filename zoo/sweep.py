"""Many runs at once on Ray: a grid of algorithms x benchmarks x goal modes x seeds x hyperparameter sets, a
report with rliable statistics (``report FOLDER``), or an Optuna search (``--optimize``).

The command lives in :mod:`d2r_sb3.zoo.sweep` (also installed as ``d2r-sweep``); run ``python zoo/sweep.py --help``.
"""

from d2r_sb3.zoo.sweep import cli

if __name__ == "__main__":
    cli()
