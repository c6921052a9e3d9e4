"""Shared test setup: load OpenBLAS before anything imports mlx, and point at the committed fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import musicgen  # noqa: F401  (loads OpenBLAS before mlx is imported)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's conversion cache or HF cache from tests."""
    monkeypatch.setenv("MUSICGEN_MLX_CACHE", str(tmp_path_factory.mktemp("musicgen-cache")))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    if "HF_HUB_CACHE" not in os.environ:
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
