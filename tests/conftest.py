"""Suite-wide set-up: tests marked ``cuda`` (``cuda2``) skip without one (two) CUDA GPUs, so that the CPU suite in CI
collects them and ``pytest -m cuda`` on a GPU machine runs them."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if gpus < 1 and item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif gpus < 2 and item.get_closest_marker("cuda2") is not None:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
