"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread.

    Small matmuls gain nothing from intra-op threads, and on a busy 2-core box OpenMP threads
    waiting on each other made these tests 5-100x slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
