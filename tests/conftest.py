"""Shared fixtures: tiny models named for the case they cover, and the bundled samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import SAMPLES

# The models under test are tiny: one thread is 10-25x faster than torch's default on a shared
# 2-core machine, where threads mostly wait for each other.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def samples_dir() -> Path:
    return SAMPLES
