"""Host memory reuse for CPU training: freed activation-sized buffers come back without page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lhtcli.training import allocator

# Run in a fresh interpreter, as `lht train` starts: glibc's thresholds are process-wide, and a long
# pytest process may have a heap that can no longer grow in place.
_PROBE = """
import ctypes, json, resource, sys
import torch
from lhtcli.training.allocator import reuse_freed_memory

def one_step():  # the buffers of a step: activations of 4-16 MB, allocated and written, then freed
    buffers = [torch.empty(n).fill_(1.0) for n in (4 << 20, 1 << 20, 3 << 20, 1 << 20, 4 << 20)]
    del buffers

def faults_per_step(steps=4):
    one_step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        one_step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps

mallopt = ctypes.CDLL(None).mallopt
mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
assert mallopt(-3, 128 << 10) == 1 and mallopt(-1, 128 << 10) == 1  # glibc's static defaults
fresh = faults_per_step()
applied = reuse_freed_memory()
print(json.dumps({"fresh": fresh, "applied": applied, "reused": faults_per_step()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if "mallopt" in done.stderr and done.returncode:
        pytest.skip("this C library has no mallopt")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["applied"] is True
    assert result["fresh"] > 10000  # without reuse every buffer is fresh pages: ~13k faults per step
    # (a buffer freed between two live ones can be a few bytes short for the next, aligned request of
    # its size, so a step may still fault one buffer in; a training step goes from ~90k faults to ~1k)
    assert result["reused"] < result["fresh"] / 3


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.reuse_freed_memory() is False
