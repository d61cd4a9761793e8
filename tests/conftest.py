import os

import pytest
import torch

# Two cores on CI: keep each test process from oversubscribing them.
torch.set_num_threads(int(os.environ.get("NL_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def two_real_threads(monkeypatch):
    """Two torch threads under passive OpenMP waiting: the setting in which memories split across threads."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
