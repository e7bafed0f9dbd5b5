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
    ("send", ["--room", "bad room"],
     "--room 'bad room': expected 1-64 letters, digits, '_', '.' or '-', the first a letter or digit, got 'bad room'"),
    ("send", ["--token", ""], "--token: expected a non-empty string"),
    ("send", ["--token", "x" * 300], "--token: expected at most 256 characters, got 300"),
    ("receive", ["--token", ""], "--token: expected a non-empty string"),
    ("receive", ["--token", "x" * 300], "--token: expected at most 256 characters"),
    ("demo", ["--token", "x" * 300], "--token: expected at most 256 characters"),
    ("serve", ["--room", "../x"], "--room ../x: expected 1-64 letters"),
    # the flags whose configs named their own fields (size:, port:, gain:, ...) or nothing (a frame rate)
    ("send", ["--size", "63"], "--size 63: expected a multiple of 8 in [64, 2048], got 63"),
    ("demo", ["--size", "63"], "--size 63: expected a multiple of 8"),
    ("serve", ["--size", "63"], "--size 63: expected a multiple of 8"),
    ("demo", ["--port", "70000"], "--port 70000: expected 0..65535, got 70000"),
    ("receive", ["--port", "-1"], "--port -1: expected 0..65535"),
    ("send", ["--signaling", "http://h/ws"], "--signaling http://h/ws: expected ws:// or wss://"),
    ("send", ["--max-viewers", "0"], "--max-viewers 0: expected >= 1, got 0"),
    ("receive", ["--max-viewers", "0"], "--max-viewers 0: expected >= 1, got 0"),
    ("serve", ["--max-viewers", "0"], "--max-viewers 0: expected >= 1, got 0"),
    ("send", ["--source-fps", "0"], "--source-fps 0: expected a frame rate in [1, 240]"),
    ("demo", ["--source-fps", "nan"], "--source-fps nan: expected a frame rate in [1, 240]"),
    ("serve", ["--head-gain", "-1"], "--head-gain -1: expected 0..10"),
    ("serve", ["--device", "cuda", "--gpus", "0"], "--gpus 0: expected >= 1"),
    ("send", ["--min-kbps", "10"], "--min-kbps 10, --start-kbps 2500, --max-kbps 6000: expected 50 <= --min-kbps <= "
     "--start-kbps <= --max-kbps <= 100000, got 10, 2500, 6000"),
    ("receive", ["--web-dir", "/no/such/web"], "--web-dir /no/such/web: no such folder"),
    ("send", ["--refiner", "/no/such/refiner"], "--refiner /no/such/refiner: no such folder (expected a folder holding "
     "refiner.json and refiner.safetensors"),
    ("serve", ["--refiner", "./nowhere"], "--refiner ./nowhere: no such folder"),
])
def test_a_bad_flag_is_one_line_naming_it_before_anything_loads_or_is_said(command, flags, said, capsys, caplog):
    """The configs' errors named their fields ("size: ...", "gain: ...", "max_viewers_per_room: ..."), not the
    flags typed, and send, demo and serve said "device: cpu" first."""
    from telepresence.cli import main

    with caplog.at_level("INFO", logger="telepresence"):
        code = main([command, "--port", "0", *flags] if command != "send" else [command, "--source", "sample", *flags])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"telepresence {command}: {said}"), err
    assert not caplog.records, caplog.text  # nothing before it (the "device: cpu" line was)


def test_a_web_dir_that_is_a_file_is_named_as_one(tmp_path, capsys):
    from telepresence.cli import main

    (tmp_path / "index.html").write_text("")
    assert main(["receive", "--web-dir", str(tmp_path / "index.html")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"telepresence receive: --web-dir {tmp_path / 'index.html'}: is a file, not a folder")


def test_flag_message_leaves_other_messages_and_the_value_got_alone():
    from telepresence.cli.console import flag_message

    args = argparse.Namespace(room="size", size=None)
    assert flag_message(ValueError("room: expected x, got 'size'"), args) == "--room size: expected x, got 'size'"
    assert flag_message(ValueError("size: expected a multiple of 8"), args) == "--size: expected a multiple of 8"
    assert flag_message(ValueError("cannot read it: no such file"), args) == "cannot read it: no such file"
