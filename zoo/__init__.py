"""The d2r_sb3 model zoo: command-line scripts modelled on rl-baselines3-zoo.

Run them from the repository root, e.g. ``python zoo/train.py --algo d2r --env MT10`` (or ``python -m
zoo.train``). ``zoo/utils.py`` holds the helpers they share (hyperparameter files, log folders, run info).
"""
