"""Shared fixtures: modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64():
    """Run the test with float64 as the default dtype (the exact references need it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """Small problems: a second (contended) thread only slows them down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
