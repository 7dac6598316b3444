"""keep_freed_memory: freed memory stays in the process, so growing allocations stop costing page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Buffers of 10, 11, ..., 30 MiB, each written once and freed: a step whose per-call buffers grow with the routes.
# With glibc's dynamic thresholds each new largest size is a fresh mapping, first touched page by page.
GROWING_BUFFERS = """
import resource, sys, torch
from d2r_sb3 import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.empty(2**20).fill_(1.0)  # torch's own start-up allocations out of the count
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in range(10, 31):
    buffer = torch.empty(mib * 2**18)  # float32: mib MiB
    buffer.fill_(1.0)
    del buffer
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", GROWING_BUFFERS, mode], capture_output=True, text=True, check=True, timeout=120
    )
    applied, faults = result.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_growing_buffers_reuse_freed_memory_instead_of_faulting_it_in_again():
    applied, kept = page_faults("keep")
    assert applied == "True"
    _, default = page_faults("default")
    pages_per_mib = 2**20 // 4096
    # Default thresholds: about every buffer is new memory (420 MiB in all, measured 420); kept: the heap grows to
    # the largest buffer's size about once (measured 57 MiB).
    assert default > 300 * pages_per_mib, default
    assert kept < 100 * pages_per_mib, kept
