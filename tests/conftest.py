"""Shared fixtures (modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``) and the
hypothesis profile of the property tests: a fixed seed, no deadline, few examples."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings


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


settings.register_profile(
    "implicitnets",
    derandomize=True,  # the same examples on every run and machine
    database=None,  # nothing saved between runs (no .hypothesis folder)
    deadline=None,  # timings on a shared CI machine are not a property
    max_examples=10,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("implicitnets")
