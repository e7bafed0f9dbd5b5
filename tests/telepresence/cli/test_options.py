"""Shared pipeline flags: the appearance memory is off unless --memory."""
import argparse

from telepresence.cli.options import add_pipeline_arguments, pipeline_config_from_args


def test_memory_is_off_by_default_and_memory_turns_it_on():
    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu"])).memory is False
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu", "--memory"])).memory is True
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu", "--no-memory"])).memory is False
