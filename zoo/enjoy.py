"""Watch a multi-task policy solve one task: per-episode return and success, optional video or window.

The command lives in :mod:`d2r_sb3.zoo.enjoy` (also installed as ``d2r-enjoy``); run ``python zoo/enjoy.py --help``.
"""

from d2r_sb3.zoo.enjoy import cli

if __name__ == "__main__":
    cli()
