"""Shared fixtures (modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``), the
device the numerical tests run on, and the hypothesis profile of the property tests: a fixed
seed, no deadline, few examples.

The device
----------
``IMPLICITNETS_TEST_DEVICE`` names the torch device of the tests that take the ``device``
fixture (default ``cpu``)::

    IMPLICITNETS_TEST_DEVICE=cuda pytest -q            # the whole suite, numerical tests on the GPU
    IMPLICITNETS_TEST_DEVICE=cuda pytest -q -m device  # only the tests that take the device

A device that this machine cannot run (``cuda`` without CUDA, ``meta``, a misspelt name) stops
the session before any test runs, with one line saying why; nothing falls back to the CPU.

Every test that takes ``device`` is marked ``device`` (``-m device`` selects them): the forward
solvers (fixed-point, Anderson, Broyden, splitting; per-sample control), the linear solvers, the
backward modes against their dense references, higher-order derivatives and ``torch.func``,
autocast and ``torch.compile``, the layer, the monotone maps, the warm-start cache and the
models.  They build their maps and modules on the CPU and move them with ``.to(device)``, draw
random tensors on the CPU (the same numbers on every device) and move them, and create
constant tensors with ``device=``.  The library is never told the device: it must follow its
inputs, which is what running these tests on a GPU checks (``torch.set_default_device`` would
hide a tensor that the library creates on the default device instead of its input's).

The other tests run on the CPU whatever the variable says.  By design: DDP over gloo
(``test_ddp_faults``), the scripts run as subprocesses (``test_train_mnist``, ``test_scripts``,
``test_hpo_scripts``, ``test_chains``, ``test_stability``, ...; ``benchmarks/device_check.sh``
runs ``train.mnist`` on the GPU instead), the documentation's code blocks (``test_docs``),
checkpoints, option checks, and the counting of host reads (``test_operator``).  Not converted
yet: diagnostics, hypergradients, the graph layer, iMAML, the open-core protocols, the property
tests, failure policies, the conv spectral norm, closed-form Jacobians and memory growth.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICE_VARIABLE = "IMPLICITNETS_TEST_DEVICE"
_DEVICE = pytest.StashKey[torch.device]()  # the resolved device, kept on the pytest config


def resolve_device() -> torch.device:
    """The device named by ``IMPLICITNETS_TEST_DEVICE`` (default ``cpu``); ``pytest.UsageError``
    if this machine cannot compute on it."""
    name = os.environ.get(DEVICE_VARIABLE, "").strip() or "cpu"
    where = f"{DEVICE_VARIABLE}={name!r}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"{where} is not a torch device ({str(err).splitlines()[0]})") from None
    if device.type == "meta":
        raise pytest.UsageError(f"{where}: meta tensors have no values, and the tests compare values; "
                                "use cpu or an accelerator")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(f"{where}, but torch.cuda.is_available() is False on this machine "
                                    f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise pytest.UsageError(f"{where}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        torch.ones(1, device=device).add_(1).cpu()
    except (RuntimeError, AssertionError) as err:  # torch raises AssertionError for a backend it was built without
        raise pytest.UsageError(f"{where}: cannot compute on it here ({str(err).splitlines()[0][:160]})") from None
    return device



def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"device: the test runs on the device named by {DEVICE_VARIABLE}")
    config.stash[_DEVICE] = resolve_device()  # fails the session here, before collection


def pytest_report_header(config: pytest.Config) -> str:
    return f"implicitnets test device: {config.stash[_DEVICE]} ({DEVICE_VARIABLE})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)



@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The torch device of the numerical tests (``IMPLICITNETS_TEST_DEVICE``, default cpu)."""
    return pytestconfig.stash[_DEVICE]


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
