"""The d2r_sb3 model zoo, modelled on rl-baselines3-zoo: train, watch, evaluate, plot and analyse multi-task agents.

Each command is a module with a ``main(argv)`` and is installed as a console command: ``d2r-train``
(:mod:`~d2r_sb3.zoo.train`), ``d2r-enjoy``, ``d2r-evaluate``, ``d2r-plot`` and ``d2r-analyze``; the repository's
``zoo/*.py`` scripts run the same commands (``python zoo/train.py --algo d2r --env MT10``). Under them:
:mod:`~d2r_sb3.zoo.exp_manager` sets up a new run, :mod:`~d2r_sb3.zoo.resume` continues one,
:mod:`~d2r_sb3.zoo.training` trains it, and :mod:`~d2r_sb3.zoo.utils` holds the shared option parsing,
hyperparameter files and records. The run folder's layout is :class:`d2r_sb3.common.run_layout.RunLayout`.
"""
