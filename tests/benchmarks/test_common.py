"""benchmarks.common: the one set of timing statistics and the one JSON layout."""
import json

import pytest

from benchmarks.common import document, dumps, time_ms, timing_stats, write_json
from models.runinfo import run_metadata


def test_timing_stats():
    s = timing_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["n"] == 5 and s["p90"] == pytest.approx(61.6) and s["p95"] == pytest.approx(80.8)
    assert s["mean"] == pytest.approx(22.0) and s["min"] == 1.0 and s["max"] == 100.0
    assert timing_stats([])["median"] is None and timing_stats([None, 2.0])["n"] == 1


def test_time_ms_calls_warmup_plus_repeats():
    calls = []
    s = time_ms(lambda: calls.append(1), "cpu", warmup=2, repeats=5)
    assert len(calls) == 7 and s["n"] == 5 and 0 <= s["min"] <= s["median"] <= s["max"]


def test_every_benchmark_writes_meta_config_results(tmp_path):
    path = write_json(tmp_path / "sub" / "x.json", document(run_metadata("cpu", benchmark="x"), {"a": tmp_path}, [1]))
    doc = json.loads(path.read_text())
    assert list(doc) == ["meta", "config", "results"] and doc["results"] == [1] and doc["config"]["a"] == str(tmp_path)
    assert not (tmp_path / "sub" / "x.json.tmp").exists()


def test_a_series_takes_one_line_and_the_json_reads_back_the_same():
    quoted = 'a "quoted" word'
    doc = {"samples": [1, 2.5, None, "x", True], "nested": {"rows": [[1, 2], (3, quoted)], "empty": []}, "s": "x"}
    text = dumps(doc)
    assert '"samples": [1, 2.5, null, "x", true]' in text and json.dumps([3, quoted]) in text
    assert json.loads(text) == {**doc, "nested": {"rows": [[1, 2], [3, quoted]], "empty": []}}
    assert len(text.splitlines()) == 11  # the dicts indented, each series on one line


def test_committed_results_share_the_layout():
    from tests.conftest import REPO

    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        doc = json.loads(path.read_text())
        assert list(doc) == ["meta", "config", "results"], path.name
        meta = doc["meta"]
        assert {"benchmark", "date", "commit", "versions", "device", "host"} <= set(meta), path.name
        assert {"type", "name"} <= set(meta["device"]), path.name
