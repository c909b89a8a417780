"""A pytest plugin that hides DropBlock's C extension, as an install without a C compiler lacks it.

``PYTHONPATH=dev:tests python -m pytest -p no_c_extension ...`` (``.ci/run``): the extension cannot be
imported, so DropBlock takes its torch-op writes and draws, and the C-specific tests skip.
"""

from __future__ import annotations

import sys

import pytest

sys.modules["spatialdrop._dropblock._cfused"] = None  # type: ignore[assignment]  # import raises


def pytest_report_header() -> str:
    """Say in the run's header that the extension is hidden."""
    return "spatialdrop: the C extension is hidden (no_c_extension)"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to run when spatialdrop was imported with its extension before the plugin loaded."""
    from spatialdrop._dropblock import fused

    if fused.extension() is not None:
        raise pytest.UsageError("no_c_extension: spatialdrop was imported with its C extension")
