"""Shared pipeline flags (the appearance memory on unless --no-memory, the refiner compiled only with --compile-refiner),
serve's camera rate, and the room and token every command checks at its start."""
import argparse

import pytest

from telepresence.cli.options import add_pipeline_arguments, pipeline_config_from_args


def test_memory_is_on_by_default_and_no_memory_turns_it_off():
    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu"])).memory is True
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu", "--memory"])).memory is True
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu", "--no-memory"])).memory is False


def test_compile_refiner_is_off_by_default():
    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    assert not pipeline_config_from_args(parser.parse_args(["--device", "cpu"])).compile_refiner
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu", "--compile-refiner"])).compile_refiner


def test_serve_asks_cameras_for_the_rate_their_pipeline_uses_unless_told_not_to():
    from telepresence.cli.receive import config_from_args
    from telepresence.cli.serve import build_parser, call_config_from_args

    parser = build_parser()
    for argv, expected in (([], True), (["--no-camera-rate"], False)):
        args = parser.parse_args(["--device", "cpu", *argv])
        assert call_config_from_args(args, config_from_args(args)).camera_rate is expected


def test_serve_spreads_over_every_gpu_unless_told_how_many():
    from telepresence.cli.receive import config_from_args
    from telepresence.cli.serve import build_parser, call_config_from_args

    parser = build_parser()
    for argv, expected in (([], None), (["--gpus", "2"], 2), (["--gpus", "1"], 1)):
        args = parser.parse_args(["--device", "cuda", *argv])
        assert call_config_from_args(args, config_from_args(args)).gpus == expected
    args = parser.parse_args(["--device", "cuda", "--gpus", "0"])
    with pytest.raises(ValueError, match="gpus"):
        call_config_from_args(args, config_from_args(args))


@pytest.mark.parametrize("command, flags, said", [
    ("send", ["--room", "bad room"], "room: expected 1-64 letters, digits, '_', '.' or '-', the first a letter or digit, got 'bad room'"),
    ("send", ["--token", ""], "token: expected a non-empty string"),
    ("send", ["--token", "x" * 300], "token: expected at most 256 characters, got 300"),
    ("receive", ["--token", ""], "token: expected a non-empty string"),
    ("receive", ["--token", "x" * 300], "token: expected at most 256 characters"),
    ("demo", ["--token", "x" * 300], "token: expected at most 256 characters"),
    ("serve", ["--room", "../x"], "room: expected 1-64 letters"),
])
def test_a_room_or_token_no_join_would_take_is_one_line_before_anything_loads(command, flags, said, caplog):
    from telepresence.cli import main

    with caplog.at_level("ERROR", logger="telepresence"):
        code = main([command, "--port", "0", *flags] if command != "send" else [command, "--source", "sample", *flags])
    assert code == 2
    assert said in caplog.text, caplog.text
