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


@pytest.mark.parametrize("prog", ["densecap", "vse"])
def test_log_level_after_the_subcommand_in_every_cli(prog):
    if prog == "densecap":
        from densecap.cli import make_parser as build
    else:
        from vse_train.cli import _parser as build
    args, _ = build().parse_known_args(["filters" if prog == "densecap" else "models", "--log-level", "debug"])
    assert args.log_level == "DEBUG"


def test_stages_lists_the_fields_of_wrapped_configs(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    densecap = out[out.index("densecap  (") :].split("\n\n")[0]
    assert "params.caption_sources" in densecap and "params.config =" not in densecap
