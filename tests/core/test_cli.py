"""The d2s command line: options accepted where users put them."""

import logging

import pytest

from d2s.cli import build_parser, main


@pytest.mark.parametrize(
    "argv, level",
    [
        (["run", "p.yaml", "--log-level", "debug"], "DEBUG"),
        (["--log-level", "ERROR", "run", "p.yaml"], "ERROR"),
        (["--log-level", "ERROR", "run", "p.yaml", "x=1", "--log-level", "WARNING"], "WARNING"),
        (["run", "p.yaml"], None),
        (["stages", "--log-level", "INFO"], "INFO"),
    ],
)
def test_log_level_before_or_after_the_subcommand(argv, level):
    args, _ = build_parser().parse_known_args(argv)
    assert args.log_level == level


def test_log_level_after_subcommand_takes_effect():
    root = logging.getLogger()
    before = root.level
    try:
        assert main(["stages", "--log-level", "WARNING"]) == 0
        assert root.level == logging.WARNING
    finally:
        root.setLevel(before)
