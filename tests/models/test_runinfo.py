"""models.runinfo: the one run-metadata record (commit, date, versions, device, host)."""
import datetime

import numpy as np

from models.runinfo import device_info, package_versions, run_metadata


def test_run_metadata_names_the_commit_the_packages_and_the_machine():
    meta = run_metadata("cpu", benchmark="unit", argv=["x"])
    assert list(meta)[:6] == ["date", "commit", "dirty", "versions", "device", "host"]
    assert datetime.datetime.fromisoformat(meta["date"]).tzinfo is not None
    assert meta["commit"] is None or len(meta["commit"]) == 40  # None outside a git checkout
    assert meta["versions"]["numpy"] == np.__version__ and meta["versions"]["python"]
    assert meta["device"]["type"] == "cpu" and meta["device"]["name"]
    assert meta["host"]["cpu_count"] >= 1
    assert meta["benchmark"] == "unit" and meta["argv"] == ["x"]


def test_versions_are_none_for_what_is_not_installed_and_devices_keep_their_type():
    assert package_versions(("surely_not_a_package_name",))["surely_not_a_package_name"] is None
    assert device_info("cpu")["type"] == "cpu"
