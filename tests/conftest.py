"""Shared test helpers: fixture paths and small models."""

from __future__ import annotations

import os

import pytest
import torch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# Keep the suite deterministic and light on a 2-core machine.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


@pytest.fixture(scope="session")
def lpd_parity():
    return torch.load(fixture_path("lpd_parity_8x8.pt"), weights_only=True)


@pytest.fixture(scope="session")
def manifest():
    import json

    with open(fixture_path("state_dict_manifest.json")) as f:
        return json.load(f)
