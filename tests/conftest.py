"""Test-suite settings.

Tests use small networks and batches, for which one torch thread is as fast as two and far more robust when
several processes share the machine's cores (OpenMP threads spin while waiting). Set D2R_TEST_THREADS to
override.
"""

import os

import torch as th

th.set_num_threads(int(os.environ.get("D2R_TEST_THREADS", "1")))
