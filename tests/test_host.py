"""cvae.host: freed host buffers stay in the heap, so a training step's allocations of the
same sizes do not fault their pages in again at every step."""

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvae.host import _glibc

ROOT = Path(__file__).resolve().parents[1]

# Twenty "steps" that each allocate, touch and free buffers above glibc's largest dynamic
# mmap threshold (32 MiB), as a batched rollout does; prints whether the setting is in
# effect and the page faults of steps 10-19 (after the heap has settled).
STEPS = """
import resource, torch
from cvae.host import reuse_freed_host_memory
applied = reuse_freed_host_memory()
assert reuse_freed_host_memory() is applied  # once per process, same answer
total = 0
for step in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [torch.ones(size // 4) for size in (48 << 20, 64 << 20, 96 << 20)]
    del buffers
    if step >= 10:
        total += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, total)
"""
PAGES_PER_STEP = (48 + 64 + 96) * 256  # 4 KiB pages in one step's buffers: 53,248


def _run_steps(**env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", STEPS], cwd=ROOT, capture_output=True,
                         text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_freed_buffers_are_reused_instead_of_faulted_in_every_step():
    applied, faults = _run_steps()
    assert applied == "True"
    # Without the setting every step faults all its pages in (the opt-out below); with it,
    # ten steps together fault less than one step's worth.
    assert faults < PAGES_PER_STEP, faults

    applied, faults = _run_steps(CVAE_HOST_MALLOC="0")
    assert applied == "False"
    assert faults > 9 * PAGES_PER_STEP, faults


def test_off_glibc_nothing_is_applied(monkeypatch):
    from cvae import host

    monkeypatch.setattr(host, "_applied", None)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert host.reuse_freed_host_memory() is False


@pytest.mark.skipif(_glibc() is None, reason="mallopt is glibc's")
def test_the_runner_applies_it_when_it_trains_on_a_cpu():
    code = ("from cvae import host\n"
            "from experiments.registry import resolve_spec\n"
            "from experiments.runner import build_state\n"
            "build_state(resolve_spec('report_final'), 'cpu')\n"
            "print(host._applied)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split()[-1] == "True"
