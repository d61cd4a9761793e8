import os

import pytest
import torch

# Two cores on CI: keep each test process from oversubscribing them.
torch.set_num_threads(int(os.environ.get("NL_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
