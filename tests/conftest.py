"""Where device-aware tests run: ``EVOTORCH_MQA_MOE_TEST_DEVICE`` (default ``cpu``).

``EVOTORCH_MQA_MOE_TEST_DEVICE=cuda pytest`` runs every test that takes the ``device``
fixture on the GPU (bench/gpu_check.sh does this) and the tests marked ``cuda``,
which are skipped otherwise. Tests that build their own tensors without the fixture
stay on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE_VARIABLE = "EVOTORCH_MQA_MOE_TEST_DEVICE"
TEST_DEVICE = torch.device(os.environ.get(DEVICE_VARIABLE, "cpu"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"cuda: needs a CUDA device ({DEVICE_VARIABLE}=cuda)")
    config.addinivalue_line("markers", "device: takes the device fixture (set automatically)")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: `-m device` picks the device-aware tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"needs {DEVICE_VARIABLE}=cuda")
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)
        if TEST_DEVICE.type != "cuda" and item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device under test (``EVOTORCH_MQA_MOE_TEST_DEVICE``, default cpu)."""
    return TEST_DEVICE
