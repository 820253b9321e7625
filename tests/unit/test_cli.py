"""Bad input on the command line gets one clear line and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_a_yaml_syntax_error_names_the_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmembers: {a: [1, 2\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not valid YAML at line 3, column 1" in err and "Traceback" not in err


def test_a_data_file_that_is_not_utf8_names_the_byte_and_the_fix(tmp_path: Path, capsys) -> None:
    data = tmp_path / "all.csv"
    data.write_bytes(b"text,label\ngood,1\ncaf\xe9 ok,1\nbad,0\nmeh,0\n")
    args = ["validate", str(REPO / "configs" / "tiny.yaml"), f"data.source={data}",
            "data.intensity_column=null", "--data"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is not UTF-8 text: byte 0xe9 on line 3" in err and "iconv" in err


@pytest.mark.parametrize("argv, message", [
    (["query", "--url", "127.0.0.1:8000", "hi"], "has no scheme; use e.g. http://127.0.0.1:8000"),
    (["--log-level", "LOUD", "validate", "x.yaml"], "invalid choice: 'LOUD'"),
    (["serve", "run", "--method", "bogus"], "invalid choice: 'bogus'"),
    (["serve", "run", "--cascade-confidence", "sure"], "invalid choice: 'sure'"),
])
def test_flags_reject_bad_values_before_anything_starts(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_address_means_the_ray_cluster_everywhere_and_the_cli_has_a_version(capsys):
    from ensemble.cli import build_parser

    parser = build_parser()
    for flag in ("--address", "--ray-address"):  # the second: the name serve used before
        assert parser.parse_args(["serve", "run", flag, "auto"]).ray_address == "auto"
    for command in (["train", "c.yaml"], ["tune", "c.yaml"], ["distill", "run", "--layers", "3"],
                    ["predict", "run", "in.csv", "-o", "o"]):
        assert parser.parse_args([*command, "--address", "auto"]).address == "auto"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("ensemble ")


@pytest.mark.parametrize("command", ["validate", "train", "tune", "launch"])
def test_every_config_command_takes_options_and_overrides_in_any_order(command) -> None:
    from ensemble.cli import parse_args

    options = {"validate": ["--data"], "train": ["--verbose"], "tune": ["--address", "auto"],
               "launch": ["--address", "http://h:1"]}[command]
    for argv in ([command, "c.yaml", "a.b=1", *options, "c=2"],
                 [command, *options, "c.yaml", "a.b=1", "c=2"],
                 [command, "c.yaml", *options, "--", "a.b=1", "c=2"]):
        args = parse_args(argv)
        assert (args.config, args.overrides) == ("c.yaml", ["a.b=1", "c=2"]), argv


@pytest.mark.parametrize("argv, message", [
    (["train", "c.yaml", "--bogus"], "unknown option '--bogus' (see `ensemble train --help`)"),
    (["launch", "c.yaml", "--verbose", "a=1"], "unknown option '--verbose'"),
    (["train", "c.yaml", "--verbose", "rounds"], "unexpected argument 'rounds'"),
    (["serve", "status", "a=1"], "`ensemble serve` takes no overrides"),
])
def test_an_unplaceable_word_is_one_line_and_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
