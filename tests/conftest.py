"""Fixtures shared by every test directory."""

import pytest
import torch


@pytest.fixture()
def single_thread():
    """Tiny models run many times faster on one thread when the 2-core machine is shared (two
    OpenMP thread pools spinning against each other); the thread count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
