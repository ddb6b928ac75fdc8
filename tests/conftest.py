"""Fixtures and settings shared by every test directory."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests (hypothesis): the default profile is derandomized, so CI and mutation runs see the
# same examples every time; HYPOTHESIS_PROFILE=explore draws fresh ones (docs/testing.md).
settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_sessionstart(session):
    # tests/test_portability.py runs selected tests under a forced CPU capability; make sure torch
    # took it, or those runs would silently test the native kernels again
    expected = os.environ.get("SUBSPACE_EXPECT_CPU_CAPABILITY")
    if expected and torch.backends.cpu.get_cpu_capability() != expected:
        raise pytest.UsageError(f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')!r} gave "
                                f"{torch.backends.cpu.get_cpu_capability()}, not {expected}")


@pytest.fixture()
def single_thread():
    """Tiny models run many times faster on one thread when the 2-core machine is shared (two
    OpenMP thread pools spinning against each other); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
