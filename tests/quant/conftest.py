"""Fixtures shared by the quant tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on tiny tensors the intra-op pool's fork/join costs more
    than the ops (35x under load). Modules that want it for every test set
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
