"""Shared test set-up: one thread, so the suite is reproducible and fits 2 cores."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
