"""The served export of tests/serve, built once for the session (see tests/serve_support)."""

from __future__ import annotations

import pytest

from tests.serve_support import ServedFixture, make_served_export


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedFixture:
    return make_served_export(tmp_path_factory.mktemp("serve"))
