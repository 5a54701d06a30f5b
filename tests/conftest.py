"""Suite-wide set-up: tests marked ``cuda`` (``cuda2``) skip without one (two) CUDA GPUs, so that the CPU suite in CI
collects them and ``pytest -m cuda`` on a GPU machine runs them."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and matrices: one intra-op thread is faster, and on a shared 2-core machine far less prone to
    stalls. Use it per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if gpus < 1 and item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif gpus < 2 and item.get_closest_marker("cuda2") is not None:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
