from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Mesh


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    """Relays and nodes started by the test; all stopped afterwards, also on failure."""
    harness = Mesh(tmp_path)
    try:
        yield harness
    finally:
        harness.close()
