"""Shared pipeline flags: the appearance memory is on unless --no-memory."""
import argparse

from telepresence.cli.options import add_pipeline_arguments, pipeline_config_from_args


def test_memory_is_on_by_default_and_no_memory_turns_it_off():
    parser = argparse.ArgumentParser()
    add_pipeline_arguments(parser)
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu"])).memory is True
    assert pipeline_config_from_args(parser.parse_args(["--device", "cpu", "--no-memory"])).memory is False
