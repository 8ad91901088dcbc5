"""The training processes' malloc settings (pcbench/allocator.py): fewer page faults, the user's
own settings respected."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource, sys
    from pcbench.util import allocator
    tuned = allocator.tune() if sys.argv[1] == "tune" else False
    import torch
    torch.set_num_threads(1)
    x = torch.randn(2048, 256)
    w = (torch.randn(256, 256) * 0.05).requires_grad_()
    for step in range(60):  # a training loop's pattern: activations allocated and freed every step
        if step == 10:  # after a warm-up: the faults of the steady state
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        h = x
        for _ in range(8):
            h = torch.tanh(h @ w)
        h.sum().backward()
        w.grad = None
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _probe(mode: str, **env) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "PCBENCH_MALLOC"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**full, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")


@glibc
def test_tuned_allocator_faults_far_fewer_pages():
    _, plain = _probe("plain")
    tuned, faults = _probe("tune")
    assert tuned == "True"
    assert faults < 0.25 * plain, (faults, plain)  # measured: <= 3k vs >= 26k


@glibc
@pytest.mark.parametrize("env", [{"PCBENCH_MALLOC": "system"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"MALLOC_ARENA_MAX": "2"}])
def test_users_malloc_settings_are_left_alone(env):
    assert _probe("tune", **env)[0] == "False"
