"""The store of whole compiled functions (models.avatar.precompiled): saved by one store, loaded by the next without
tracing, never served for other arguments or other code. Each case compiles small functions with inductor on the CPU
(seconds each)."""
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import models.avatar.precompiled as precompiled
from models.avatar.precompiled import PrecompiledStore, global_state, signature

pytestmark = pytest.mark.skipif(not precompiled.supported(), reason="needs torch.compiler.load_compiled_function (torch 2.9+)")

@dataclasses.dataclass(frozen=True)
class Plan:
    steps: int
    gain: float


def stepped(plan: Plan, t: dict) -> torch.Tensor:
    x = t["x"]
    for _ in range(plan.steps):
        x = torch.tanh(x * plan.gain) + t["bias"]
    return x.sum(-1)


class Holder:
    def __init__(self, k: int):
        self.k, self.w = k, torch.ones(6)


def held(holder: Holder, x: torch.Tensor) -> torch.Tensor:
    return x * holder.k + holder.w  # holder.k: a number its compiled code guards on, and the signature leaves out


def broken(x: torch.Tensor) -> torch.Tensor:
    if x.sum().item() > 0:  # a data-dependent branch: no whole graph
        return x + 1
    return x - 1


def inputs(n: int = 8) -> dict:
    return {"x": torch.linspace(-1, 1, n * 4).reshape(n, 4), "bias": torch.full((4,), 0.1)}


def test_a_second_store_loads_what_the_first_saved_without_compiling(tmp_path, monkeypatch, caplog):
    plan, t = Plan(steps=3, gain=1.5), inputs()
    saving = PrecompiledStore(tmp_path)
    first = saving(stepped)
    expected = stepped(plan, t)
    torch.testing.assert_close(first(plan, t), expected)
    (path,) = tmp_path.iterdir()
    assert path.suffix == ".bin"  # one file, written whole (no temporary left)
    assert [(e["function"], e["what"], e["file"]) for e in saving.events] == [("stepped", "saved", path.name)]

    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called: the saved function was not loaded")

    monkeypatch.setattr(torch, "compile", no_compile)
    store = PrecompiledStore(tmp_path)
    with caplog.at_level(logging.INFO, logger="models.avatar.precompiled"):
        again = store(stepped)
        torch.testing.assert_close(again(plan, inputs()), expected)
    assert store.loaded == 1 and store.saved == 0 and not store.fell_back
    assert "loaded in" in caplog.text
    (event,) = store.events  # what a benchmark records: which function, loaded from which file, on which thread
    assert event["function"] == "stepped" and event["what"] == "loaded" and event["file"] == path.name
    assert event["thread"] == threading.current_thread().name
    other = {"x": t["x"] * 0.5, "bias": t["bias"]}  # new values, same shapes: the same compiled function
    torch.testing.assert_close(again(plan, other), stepped(plan, other))
    assert store.loaded == 1


def test_other_arguments_or_other_code_get_files_of_their_own(tmp_path, monkeypatch):
    store = PrecompiledStore(tmp_path)
    compiled = store(stepped)
    for plan, t in [(Plan(3, 1.5), inputs(8)), (Plan(2, 1.5), inputs(8)), (Plan(3, 1.5), inputs(5))]:
        torch.testing.assert_close(compiled(plan, t), stepped(plan, t))
    assert store.saved == 3 and len(list(tmp_path.iterdir())) == 3
    # Tensors count by shape and dtype, never by value; a plan (settings) by value; a float argument by its type.
    assert signature(inputs(8)) == signature({k: v + 1 for k, v in inputs(8).items()})
    assert signature(Plan(3, 1.5)) != signature(Plan(3, 1.25))
    assert signature((torch.zeros(2), 0.5)) == signature((torch.ones(2), 0.75))
    assert signature(torch.zeros(2)) != signature(torch.zeros(2, dtype=torch.float64))
    # Edited code (another fingerprint of models/) never loads the old files, and its first save deletes them.
    old = set(tmp_path.iterdir())
    killed, saving = tmp_path / ".saving-killed", tmp_path / ".saving-now"  # a save killed half-way, one under way
    killed.write_bytes(b"half"), saving.write_bytes(b"half")
    os.utime(killed, (time.time() - 7200, time.time() - 7200))
    monkeypatch.setattr(precompiled, "source_fingerprint", lambda: "0" * 16)
    assert store.path(stepped, (signature(((Plan(3, 1.5), inputs(8)), {})), global_state())) not in old
    edited = PrecompiledStore(tmp_path)
    torch.testing.assert_close(edited(stepped)(Plan(3, 1.5), inputs(8)), stepped(Plan(3, 1.5), inputs(8)))
    assert edited.loaded == 0 and edited.saved == 1
    assert not old & set(tmp_path.iterdir()) and not killed.exists() and saving.exists()
    assert len(list(tmp_path.glob("*.bin"))) == 1


def test_a_failed_guard_or_a_graph_break_compiles_the_usual_way_and_says_so(tmp_path, caplog):
    x = torch.linspace(0, 1, 6)
    PrecompiledStore(tmp_path)(held)(Holder(2), x)
    store = PrecompiledStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="models.avatar.precompiled"):
        torch.testing.assert_close(store(held)(Holder(3), x), x * 3 + 1)  # the file of k == 2: its guard fails
        torch.testing.assert_close(store(broken)(x), x + 1)
    assert store.loaded == 1 and len(store.fell_back) == 2
    assert [(e["function"], e["what"]) for e in store.events] == [("held", "loaded"), ("held", "fell back"),
                                                                    ("broken", "fell back")]
    assert "saved guards failed (L['holder'].k == 2)" in store.fell_back[0]
    assert caplog.text.count("compiled the usual way instead") == 2


def test_a_compile_that_met_a_cuda_graph_capture_is_run_again_not_fallen_back(tmp_path, monkeypatch):
    """The compile worker's CUDA work fails while the sender's thread captures a graph: the store lets the error out
    (the worker runs the job again, models.avatar.compiling) instead of compiling the usual way and saving nothing,
    which a GPU loopback did (twentieth session)."""
    plan, t = Plan(2, 1.0), inputs()
    real_compile, clashes = torch.compile, []

    def clashing_once(fn, **kwargs):
        compiled = real_compile(fn, **kwargs)
        if clashes:
            return compiled

        class Clash:
            def aot_compile(self, example):
                clashes.append(1)
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return Clash()

    monkeypatch.setattr(torch, "compile", clashing_once)
    store = PrecompiledStore(tmp_path)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        store(stepped)(plan, t)
    assert not store.fell_back and not list(tmp_path.glob("*.bin"))
    torch.testing.assert_close(store(stepped)(plan, t), stepped(plan, t))  # the worker's second run
    assert clashes == [1] and store.saved == 1 and not store.fell_back
    assert [e["what"] for e in store.events] == ["saved"]


def test_a_corrupt_file_is_compiled_again(tmp_path, caplog):
    plan, t = Plan(2, 1.0), inputs()
    PrecompiledStore(tmp_path)(stepped)(plan, t)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"not a compiled function")
    store = PrecompiledStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="models.avatar.precompiled"):
        torch.testing.assert_close(store(stepped)(plan, t), stepped(plan, t))
    assert "could not load" in caplog.text and store.saved == 1 and store.loaded == 0
    assert path.read_bytes() != b"not a compiled function"


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "enable_aot_compile"), reason="this torch has no such switch")
def test_dynamo_s_whole_compile_switch_off_as_in_torch_2_11_still_saves(tmp_path):
    """torch 2.9-2.11 turn dynamo's enable_aot_compile off by default, and with it off torch.compile(fn) has no
    aot_compile: every function fell back on an H200 with torch 2.11 (2026-12-01). The store turns it on for its
    compile."""
    plan, t = Plan(steps=2, gain=1.0), inputs()
    with torch._dynamo.config.patch(enable_aot_compile=False):
        first = PrecompiledStore(tmp_path)
        torch.testing.assert_close(first(stepped)(plan, t), stepped(plan, t))
        second = PrecompiledStore(tmp_path)
        torch.testing.assert_close(second(stepped)(plan, t), stepped(plan, t))
        assert not torch._dynamo.config.enable_aot_compile
    assert first.saved == 1 and not first.fell_back and second.loaded == 1


def test_another_thread_count_gets_a_file_of_its_own(tmp_path, caplog):
    """Compiled code guards on torch's thread count: a sender with two threads failed the guards of every file its
    prefill child (one thread) had saved, and traced them again for minutes (H200, 2026-12-01). The count is in
    the key: each count compiles once, then loads."""
    plan, t = Plan(steps=2, gain=1.0), inputs()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        PrecompiledStore(tmp_path)(stepped)(plan, t)
        torch.set_num_threads(2)
        with caplog.at_level(logging.WARNING, logger="models.avatar.precompiled"):
            two = PrecompiledStore(tmp_path)
            torch.testing.assert_close(two(stepped)(plan, t), stepped(plan, t))
        assert two.saved == 1 and two.loaded == 0 and not two.fell_back and "guards failed" not in caplog.text
        again = PrecompiledStore(tmp_path)
        again(stepped)(plan, t)
        assert again.loaded == 1 and not again.fell_back and len(list(tmp_path.glob("*.bin"))) == 2
    finally:
        torch.set_num_threads(threads)


def test_a_store_that_cannot_save_keeps_what_it_compiled(tmp_path, monkeypatch, caplog):
    """A full or read-only disk: the function compiled whole runs in this process (no second compile) and the log
    says it was not saved; the next store compiles it again."""
    plan, t = Plan(steps=2, gain=1.0), inputs()
    folder = tmp_path / "store"
    folder.write_text("a file where the folder should be")  # mkdir fails, as on a read-only disk
    store = PrecompiledStore(folder)
    compiled = store(stepped)
    plain_compiles = []
    real_compile = torch.compile

    def counting(fn, **kwargs):
        plain_compiles.append(kwargs)
        return real_compile(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    with caplog.at_level(logging.WARNING, logger="models.avatar.precompiled"):
        torch.testing.assert_close(compiled(plan, t), stepped(plan, t))
        torch.testing.assert_close(compiled(plan, inputs()), stepped(plan, inputs()))
    assert [k.get("fullgraph") for k in plain_compiles] == [True]  # the whole compile alone, never a second one
    assert store.saved == 0 and not store.fell_back and len(store.unsaved) == 1
    assert "compiled whole" in caplog.text and "but not saved" in caplog.text


def test_a_full_store_deletes_the_files_used_longest_ago(tmp_path, caplog):
    """The store holds at most max_bytes: a save past it deletes the files loaded or saved longest ago, never the
    one just saved (a sender's files for 4 views at 512 are 140 MB; each other size or view count adds more)."""
    plans = [Plan(3, 1.0), Plan(3, 1.25), Plan(3, 1.5)]  # files of about one size: two fit, three do not
    filling = PrecompiledStore(tmp_path)
    for plan in plans[:2]:
        filling(stepped)(plan, inputs())
    first, second = (filling.path(stepped, (signature(((plan, inputs()), {})), global_state())) for plan in plans[:2])
    now = time.time()
    os.utime(first, (now - 200, now - 200))
    os.utime(second, (now - 100, now - 100))
    store = PrecompiledStore(tmp_path, max_bytes=int(2.5 * first.stat().st_size))
    torch.testing.assert_close(store(stepped)(plans[0], inputs()), stepped(plans[0], inputs()))  # loaded: used now
    with caplog.at_level(logging.INFO, logger="models.avatar.precompiled"):
        store(stepped)(plans[2], inputs())  # a third file: over the limit
    third = store.path(stepped, (signature(((plans[2], inputs()), {})), global_state()))
    assert store.loaded == 1 and store.saved == 1
    assert first.exists() and third.exists() and not second.exists()
    assert "deleted the 1 file(s) used longest ago" in caplog.text
    tiny = PrecompiledStore(tmp_path, max_bytes=1)  # smaller than any file: the one just saved stays all the same
    tiny(stepped)(plans[1], inputs())
    assert [p.name for p in tmp_path.glob("*.bin")] == [second.name]


def test_sizes_are_remembered_per_code_and_a_broken_table_is_no_table(tmp_path, monkeypatch):
    store = PrecompiledStore(tmp_path)
    assert store.known_sizes("render") == []
    store.add_size("render", 3 << 16)
    store.add_size("render", 2 << 16)
    store.add_size("render", 3 << 16)
    store.add_size("build", 1 << 16)
    later = PrecompiledStore(tmp_path)
    assert later.known_sizes("render") == [2 << 16, 3 << 16] and later.known_sizes("build") == [1 << 16]
    (path,) = tmp_path.glob("sizes-*.json")
    path.write_text("{not json")
    assert later.known_sizes("render") == []  # as if none: sized afresh and written again
    later.add_size("render", 5 << 16)
    assert later.known_sizes("render") == [5 << 16]
    path.write_text('{"render": 7, "build": ["x", 65536]}')  # JSON, but not a table of sizes
    assert later.known_sizes("render") == [] and later.known_sizes("build") == [65536]
    later.add_size("render", 5 << 16)
    assert later.known_sizes("render") == [5 << 16]
    later.prune()  # this code's own table is not "other code" (it was, and every save's prune deleted it)
    assert PrecompiledStore(tmp_path).known_sizes("render") == [5 << 16]
    monkeypatch.setattr(precompiled, "source_fingerprint", lambda: "0" * 16)  # edited code: its own table
    edited = PrecompiledStore(tmp_path)
    assert edited.known_sizes("render") == []
    edited.prune()
    assert not path.exists()


def test_the_default_folder_is_inductor_s_cache_found_without_importing_inductor(monkeypatch, tmp_path):
    import sys

    from torch._inductor.runtime import cache_dir_utils

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    expected = os.path.abspath(cache_dir_utils.default_cache_dir())
    monkeypatch.delitem(sys.modules, "torch._inductor.runtime.cache_dir_utils")
    assert precompiled.default_folder() == Path(expected) / "telepresence-precompiled"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert precompiled.default_folder() == tmp_path / "telepresence-precompiled"
