"""Shared pipeline flags (the appearance memory on unless --no-memory, the refiner compiled only with --compile-refiner) and
serve's camera rate."""
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
