"""Compiled functions kept on disk whole, so that a later process loads them instead of tracing them again.

Inductor's disk cache spares a later process inductor's work, not dynamo's: tracing the avatar's functions again
took 12.4 of the 16 s of a compile from that cache on this project's CPU, and on a GPU sender those seconds hold
Python's lock against its frames (14.5 fps each for 20-30 s at every start; docs/avatar.md).
``torch.compile(fn).aot_compile(...)`` keeps the whole compiled function (its guards, its bytecode, inductor's
output) and ``torch.compiler.load_compiled_function`` loads it without tracing: the avatar's build and one view at
128 px on the CPU in 2.2-3.0 s against 8.8-12.0 s from inductor's cache (benchmarks/precompiled.py).

:class:`PrecompiledStore` is a ``compile_fn`` for :class:`models.avatar.compiling.BackgroundCompiler`: one file
per function and per :func:`signature` of its arguments (tensors by shape, dtype and device; everything else by
value), named with a :func:`source_fingerprint` of this package's code and of torch, so that a changed function
is never served by its old compiled code. A loaded function checks its guards on its arguments at each call; where
one fails, or where a function cannot be compiled whole, it is compiled the usual way (``torch.compile``), and the
log says so. Unlike ``torch.compile``, a function compiled whole keeps the module globals it read as they were then,
unguarded (torch 2.13): the fingerprint covers every edit of them in the code, but a value a process writes into a
module's globals at run time (a test's monkeypatch) is not seen by a loaded function, so such code must not be
compiled through a store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import getpass
import hashlib
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Hashable

import torch

from models.avatar.compiling import clashed_with_a_capture, compile_fixed

log = logging.getLogger(__name__)

__all__ = ["PrecompiledStore", "compile_fn_for", "default_folder", "signature", "source_fingerprint", "supported"]

_PACKAGE = Path(__file__).resolve().parents[1]  # models/: what a compiled function of ours can trace into


def supported() -> bool:
    """This torch can load a compiled function saved whole (torch 2.9 and later; checked without importing dynamo)."""
    return hasattr(torch.compiler, "load_compiled_function")


def compile_fn_for(precompiled: bool) -> Callable[[Callable], Callable]:
    """The avatar engine's compile_fn: torch.compile (models.avatar.compiling.compile_fixed), or a store where
    ``precompiled`` is asked and this torch has what it needs (else torch.compile, and a warning says why)."""
    if not precompiled:
        return compile_fixed
    if not supported():
        log.warning("avatar: --precompiled-avatar needs torch 2.9 or later (torch.compiler.load_compiled_function); "
                    "this is torch %s: compiled from inductor's cache instead", torch.__version__)
        return compile_fixed
    log.info("avatar: its compiled functions are kept whole beside inductor's cache and loaded from there at later starts")
    return PrecompiledStore()


def default_folder() -> Path:
    """Beside inductor's own cache (``TORCHINDUCTOR_CACHE_DIR``, else torch's default): they live and go together.
    Found without importing inductor where it is not imported yet (1.3 s on this project's CPU: the engine asks at
    its first frame's capture, on the sender's thread): torch's default, ``torchinductor_<user>`` in the temporary
    folder (torch._inductor.runtime.cache_dir_utils.default_cache_dir)."""
    if "torch._inductor.runtime.cache_dir_utils" in sys.modules:
        return Path(sys.modules["torch._inductor.runtime.cache_dir_utils"].cache_dir()) / "telepresence-precompiled"
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is None:
        try:
            user = getpass.getuser()
        except (KeyError, ModuleNotFoundError, OSError):
            user = f"uid_{os.getuid()}" if hasattr(os, "getuid") else "unknown_user"
        folder = os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    return Path(os.path.abspath(folder)) / "telepresence-precompiled"


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A hash of every Python file of this package (models/) and of torch's version and build: any edit to code a
    compiled function may have traced gives other file names."""
    digest = hashlib.sha256(f"{torch.__version__} {torch.version.cuda} {torch.version.git_version}".encode())
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_PRIMITIVES = (bool, int, float, str, bytes, type(None), torch.device, torch.dtype)


def _pure(value: Any) -> bool:
    """A settings object: a dataclass of plain values, tuples of them and such dataclasses (a build plan, a config)."""
    if isinstance(value, _PRIMITIVES):
        return True
    if isinstance(value, tuple):
        return all(_pure(v) for v in value)
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and all(_pure(getattr(value, f.name)) for f in dataclasses.fields(value)))


def _tensor(value: torch.Tensor) -> Hashable:
    return ("tensor", tuple(value.shape), tuple(value.stride()), str(value.dtype), str(value.device), value.requires_grad)


def global_state() -> Hashable:
    """What of torch's process-wide state a compiled function guards on (dynamo's GLOBAL_STATE) and may differ
    between processes that run the same code: in the key, so that each gets a file it can use. A prefill child
    with one thread saved functions its sender, with two, could not load (H200, 2026-12-01)."""
    return ("global", torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            str(torch.get_default_dtype()))


def signature(value: Any) -> Hashable:
    """What a compiled function's arguments are, for the file it is kept in: tensors by shape, stride, dtype, device
    and whether they need gradients (never their values); settings objects (:func:`_pure`: build plans, configs) and
    plain values other than floats by value; a float by its type alone (torch.compile does not specialize on a float
    argument); other dataclasses and objects by their tensors and settings objects alone, one level deep (a frame's
    avatar carries per-frame numbers, which the function is not compiled for). What this leaves out and a compiled function
    still guards on fails its guards at the call, and the function is compiled the usual way (said in the log)."""
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, float):
        return ("float",)
    if _pure(value):
        return (type(value).__qualname__, repr(value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), signature(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(signature(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif hasattr(value, "__dict__"):
        parts = sorted(vars(value).items())
    else:
        return (type(value).__qualname__,)
    return (type(value).__qualname__, tuple((name, _tensor(v) if isinstance(v, torch.Tensor) else repr(v))
                                            for name, v in parts
                                            if isinstance(v, torch.Tensor) or (dataclasses.is_dataclass(v) and _pure(v))))


class PrecompiledStore:
    """``compile_fn``: ``store(fn)`` is fn compiled, loaded from ``folder`` where an earlier process saved it."""

    MAX_BYTES = 4 << 30
    """What the store keeps on disk at most (4 GiB): a GPU sender's functions for 4 views at 512 take 140 MB, each
    further view count about 20 MB, each other picture size or setting as much again; past this, the files loaded
    or saved longest ago go first (a later start that wants one compiles it again)."""

    def __init__(self, folder: str | Path | None = None, max_bytes: int | None = None):
        self._folder = Path(folder) if folder is not None else None
        self.max_bytes = self.MAX_BYTES if max_bytes is None else max_bytes
        self.loaded = 0  # functions loaded from disk so far (one per signature)
        self.saved = 0  # functions compiled whole and saved
        self.fell_back: list[str] = []  # what was compiled the usual way instead, and why
        self.unsaved: list[str] = []  # compiled whole but not saved (a full or read-only disk...), and why
        self.events: list[dict] = []
        """What happened to each function and signature, in order: {"function", "what" (loaded, saved, unsaved,
        fell back), "s", "file", "thread"}: a benchmark keeps it beside its figures (which start loaded what)."""

    def _event(self, fn: Callable, what: str, seconds: float | None, path: Path | None) -> None:
        self.events.append({"function": fn.__qualname__, "what": what,
                            "s": None if seconds is None else round(seconds, 1),
                            "file": None if path is None else path.name, "thread": threading.current_thread().name})

    @property
    def folder(self) -> Path:
        """Where the files are: the folder given, else :func:`default_folder`, found at first use (it imports inductor,
        a second or more: on the compile worker, not on a sender's thread when its pipeline is made)."""
        if self._folder is None:
            self._folder = default_folder()
        return self._folder

    def __call__(self, fn: Callable) -> Callable:
        return _Precompiled(self, fn)

    def _sizes_path(self) -> Path:
        return self.folder / f"sizes-{source_fingerprint()}.json"

    def known_sizes(self, name: str) -> list[int]:
        """The sizes that processes of this code compiled for under ``name`` (an engine's raster capacities by plan
        and view count), smallest first. A capacity is baked into compiled code and is sized from a start's first
        frame, so two starts of one sender differ by a rung now and then (the two starts of 3 of 8 shared clips, 0 s
        and 2 s in, for some view count): a size known here is a compiled function a start can load instead of compiling again."""
        try:
            with open(self._sizes_path()) as f:
                sizes = json.load(f).get(name, [])
            return sorted(v for v in sizes if isinstance(v, int))
        except (OSError, ValueError, AttributeError, TypeError):  # none yet, or a file another version left
            return []

    def add_size(self, name: str, size: int) -> None:
        """Remember that ``size`` is used under ``name`` (see :meth:`known_sizes`). Two processes adding at once
        may lose one of the two: it is only compiled again at a later start."""
        path = self._sizes_path()
        try:
            with open(path) as f:
                table = json.load(f)
            if not isinstance(table, dict):
                table = {}
        except (OSError, ValueError):
            table = {}
        known = [v for v in table.get(name, []) if isinstance(v, int)] if isinstance(table.get(name), list) else []
        if int(size) in known:
            return
        table[name] = sorted(set(known) | {int(size)})
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.folder, prefix=".saving-", delete=False) as tmp:
                json.dump(table, tmp)
            os.replace(tmp.name, path)
        except OSError as error:  # a read-only or full disk: later starts size their own
            log.debug("precompiled: cannot remember size %d for %s: %s", size, name, error)

    def prune(self, keep: Path | None = None) -> list[Path]:
        """Delete the files of other code (another fingerprint: an earlier version of models/ or of torch), which no
        process of this code loads (each is megabytes), what a killed save left an hour ago, and, while the rest
        holds more than :attr:`max_bytes`, the files used longest ago (a load or a save marks a file used), never
        ``keep`` (the file just saved). Returns what went."""
        mark, table = f"-{source_fingerprint()}-", self._sizes_path().name
        gone, old, over = [], 0, 0
        stale = time.time() - 3600.0  # a save that old was killed half-way (a save takes seconds to minutes)
        kept: list[tuple[float, int, Path]] = []
        for path in self.folder.iterdir():
            try:
                st = path.stat()
            except OSError:  # another process's prune came first
                continue
            if (path.suffix in (".bin", ".json") and mark not in path.name and path.name != table) or (
                    path.name.startswith(".saving-") and st.st_mtime < stale):
                old += _unlink(path, gone)
            elif path.suffix == ".bin":
                kept.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in kept)
        for _, size, path in sorted(kept, key=lambda k: k[0]):  # used longest ago first
            if total <= self.max_bytes:
                break
            if path != keep and _unlink(path, gone):
                total -= size
                over += 1
        if old:
            log.info("precompiled: deleted %d file(s) of other code from %s", old, self.folder)
        if over:
            log.info("precompiled: deleted the %d file(s) used longest ago from %s: it holds at most %.1f GiB",
                     over, self.folder, self.max_bytes / 2**30)
        return gone

    def path(self, fn: Callable, key: Hashable) -> Path:
        """The file of fn compiled for arguments of signature ``key``."""
        digest = hashlib.sha256(repr((fn.__module__, fn.__qualname__, key)).encode()).hexdigest()[:24]
        return self.folder / f"{fn.__qualname__.replace('.', '-')}-{source_fingerprint()}-{digest}.bin"


class _Precompiled:
    """fn compiled once per signature of its arguments: loaded from the store, else compiled whole and saved there."""

    def __init__(self, store: PrecompiledStore, fn: Callable):
        self.store, self.fn = store, fn
        self._by_key: dict[Hashable, Callable] = {}
        self._lock = threading.Lock()
        self._plain: Callable | None = None  # torch.compile(fn), where the store cannot serve

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = (signature((args, kwargs)), global_state())
        compiled = self._by_key.get(key)
        if compiled is None:
            with self._lock:
                compiled = self._by_key.get(key) or self._make(key, args, kwargs)
                self._by_key[key] = compiled
        try:
            return compiled(*args, **kwargs)
        except RuntimeError as error:
            if "GuardManager check failed" not in str(error) or compiled is self._plain:
                raise
            # The saved function guards on something the signature does not see (a global, a setting): compile it
            # the usual way; its first call runs here (a compile on the worker, before any capture uses it).
            self._fall_back(f"its saved guards failed ({_first_reason(error)})")
            self._by_key[key] = self._plain
            return self._plain(*args, **kwargs)

    def _make(self, key: Hashable, args: tuple, kwargs: dict) -> Callable:
        name, path = self.fn.__qualname__, self.store.path(self.fn, key)
        if path.exists():
            t0 = time.perf_counter()
            try:
                with open(path, "rb") as f:
                    loaded = _load(f, self.fn)
            except Exception as error:  # noqa: BLE001 - a file another torch or a killed process left: compile again
                if clashed_with_a_capture(error):
                    raise  # a CUDA-graph capture on another thread, not the file: the compile worker runs this again
                log.warning("precompiled %s: could not load %s (%s); compiling it again", name, path.name,
                            _first_line(error))
            else:
                self.store.loaded += 1
                _touch(path)  # used now: the last to go when the store is full
                self.store._event(self.fn, "loaded", time.perf_counter() - t0, path)
                log.info("precompiled %s: loaded in %.1f s (%s)", name, time.perf_counter() - t0, path.name)
                return loaded
        t0 = time.perf_counter()
        try:
            with _aot_enabled():
                compiled = torch.compile(self.fn, dynamic=False, fullgraph=True).aot_compile((args, kwargs))
        except Exception as error:  # noqa: BLE001 - a graph break, an unpicklable guard...: torch.compile as before
            if clashed_with_a_capture(error):
                # The sender's thread captured a CUDA graph meanwhile (the compile's CUDA work is forbidden then):
                # nothing wrong with the function, so no fall back (which compiled the usual way and saved nothing:
                # a GPU loopback, twentieth session); the compile worker runs the job again.
                raise
            self._fall_back(_first_line(error))
            return self._plain
        try:
            self.store.folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.store.folder, prefix=".saving-", delete=False) as tmp:
                pass
            try:
                compiled.save_compiled_function(tmp.name)
                os.replace(tmp.name, path)  # whole or not at all: a reader never sees half a file
            finally:
                if os.path.exists(tmp.name):
                    os.unlink(tmp.name)
        except Exception as error:  # noqa: BLE001 - a full or read-only disk...: this process keeps what it compiled
            self.store.unsaved.append(f"{name}: {_first_line(error)}")
            self.store._event(self.fn, "unsaved", time.perf_counter() - t0, path)
            log.warning("precompiled %s: compiled whole in %.1f s but not saved (%s): in use here, compiled again at "
                        "the next start", name, time.perf_counter() - t0, _first_line(error))
            return compiled
        self.store.saved += 1
        self.store._event(self.fn, "saved", time.perf_counter() - t0, path)
        log.info("precompiled %s: compiled whole and saved in %.1f s (%s)", name, time.perf_counter() - t0, path.name)
        self.store.prune(keep=path)
        return compiled

    def _fall_back(self, why: str) -> None:
        if self._plain is None:
            self._plain = torch.compile(self.fn, dynamic=False)
        self.store.fell_back.append(f"{self.fn.__qualname__}: {why}")
        self.store._event(self.fn, "fell back", None, None)
        log.warning("precompiled %s: %s; compiled the usual way instead (from inductor's cache where it can)",
                    self.fn.__qualname__, why)


def _unlink(path: Path, gone: list[Path]) -> bool:
    try:
        path.unlink()
    except OSError:  # another process's prune came first
        return False
    gone.append(path)
    return True


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only store: it is only pruned less well
        pass


def _first_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _aot_enabled() -> contextlib.AbstractContextManager:
    """Dynamo's switch for compiling whole (torch.compile(...).aot_compile exists only while it is on): on by default
    from torch 2.12, off in 2.9-2.11."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        return torch._dynamo.config.patch(enable_aot_compile=True)
    return contextlib.nullcontext()


def _load(file: Any, fn: Callable) -> Callable:
    """torch.compiler.load_compiled_function, given fn's module globals where this torch takes them (2.13 asks for
    them when the function refers to a module-level name; 2.9's took the file alone)."""
    load = torch.compiler.load_compiled_function
    if "f_globals" in inspect.signature(load).parameters:
        return load(file, f_globals=fn.__globals__)
    return load(file)


def _first_reason(error: BaseException) -> str:
    """The first failed guard of a GuardManager error, else its first line."""
    text = str(error)
    found = re.search(r"verbose_code_parts=\[(['\"])(.*?)\1", text, re.S)
    if found:
        return " ".join(found.group(2).split("#", 1)[0].split())[:160]
    return text.splitlines()[0][:160] if text else type(error).__name__
