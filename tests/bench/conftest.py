import logging

import pytest


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """bench.cli.main() sets up logging on the stream pytest captures; remove it after each test."""
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_d2s", False):
            root.removeHandler(h)
