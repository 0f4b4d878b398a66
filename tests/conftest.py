"""Shared test configuration: golden-file helper with a regenerate switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


class Golden:
    """Compare text against ``tests/data/NAME``; ``HVTOOLS_REGENERATE=1`` rewrites the file."""

    def check(self, name: str, text: str) -> None:
        path = DATA / name
        if os.environ.get("HVTOOLS_REGENERATE") == "1":
            path.write_text(text)
        assert path.exists(), f"golden file {path} missing: run with HVTOOLS_REGENERATE=1"
        assert text == path.read_text(), f"output differs from {path}"


@pytest.fixture
def golden() -> Golden:
    return Golden()
