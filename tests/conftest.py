import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def shared() -> Path:
    """The ../shared assets folder (real models and GLUE data)."""
    if not SHARED.is_dir():
        pytest.fail(f"the shared assets folder {SHARED} is missing")
    return SHARED


@pytest.fixture
def tokenizer():
    return tiny.tokenizer()
