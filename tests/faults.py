"""Fault injection for tests/test_crash.py and tests/test_concurrency.py: the library path (`evolve_pending`) in a
separate process, with a fault installed in THAT process only; and a disk that fills up, in this process
(`DiskFull`, tests/test_disk_full.py). Not a test module: it imports torch, transformers and Evidently at the top
so that the fork server preloads them, which is why it is not part of moecl/testing.py (a cheap import).

The processes are forked by a multiprocessing "forkserver": a fresh interpreter that imports this module (and so
torch, transformers, Evidently, matplotlib) once; each run is a fork of it, a separate process with its own pid
that the test can SIGKILL, and that starts in well under a second instead of re-importing the stack (tens of
seconds on two busy cores). Nothing of the pytest process (threads, monkeypatches) is inherited.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Imported here so that the forkserver preloads them (see context()): a forked run starts warm.
import evidently  # noqa: F401
import evidently.presets  # noqa: F401
import matplotlib.backends.backend_agg  # noqa: F401
import torch
import tqdm.std
import transformers.models.llama.modeling_llama  # noqa: F401

import moecl.drift  # noqa: F401
import moecl.evaluate  # noqa: F401
import moecl.plots  # noqa: F401
import moecl.train.step  # noqa: F401
from moecl import evolve
from moecl.testing import tiny_base

# Where each fault strikes. The process kills itself with SIGKILL at that point: no cleanup, no atexit, no
# finally blocks, exactly like `kill -9` or the OOM killer.
FAULTS = (
    "none",  # no fault: the test itself may kill the process (e.g. mid-training)
    "kill-mid-bank-write",  # after the first tensor file of the new bank is written (inside save_bank)
    "kill-before-promote",  # the challenger is registered; Registry.promote is entered but writes nothing
    "kill-after-champion-write",  # champion.json replaced; the "promoted" event not yet appended
    "kill-before-snapshot-install",  # promoted (champion.json + event); the drift reference not yet installed
)

_CONTEXT: multiprocessing.context.BaseContext | None = None


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server started (and preloading this module) in the background."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        from multiprocessing import forkserver

        forkserver.ensure_running()
        _CONTEXT = ctx
    return _CONTEXT


def start(workspace: Path, fault: str, name: str) -> tuple[multiprocessing.process.BaseProcess, Path, Path]:
    """Start `evolve_pending` on `workspace` (its params.yaml) in a new process; returns (process, log, result)."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}")
    log, result = workspace.parent / f"{name}.log", workspace.parent / f"{name}.json"
    proc = context().Process(target=run, args=(str(workspace), fault, str(log), str(result)), name=name)
    proc.start()
    return proc, log, result


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    """Patch this process so that it dies at the fault's point."""
    from moecl import bank
    from moecl.registry import Registry

    if fault == "kill-mid-bank-write":
        save = bank._save_tensors

        def save_then_die(tensors, path):
            save(tensors, path)
            _die()

        bank._save_tensors = save_then_die
    elif fault == "kill-before-promote":
        Registry.promote = lambda self, version, reason="": _die()
    elif fault == "kill-after-champion-write":
        append = Registry._append_event

        def append_or_die(self, kind, version, **details):
            if kind == "promoted":
                _die()
            return append(self, kind, version, **details)

        Registry._append_event = append_or_die
    elif fault == "kill-before-snapshot-install":
        evolve.install_snapshot = lambda *args, **kwargs: _die()


def run(workspace: str, fault: str, log_path: str, result_path: str) -> None:
    """The child: evolve_pending with tqdm progress on stderr (the log), then as JSON its outcomes, when it
    started and the times it held the evolution lock."""
    started = time.time()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(workspace)
    torch.set_num_threads(1)
    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed process cannot release: the
    # resource tracker would then warn about leaked semaphores at exit. One process needs a thread lock only.
    tqdm.std.tqdm.set_lock(threading.RLock())
    from moecl.config import load_params
    from moecl.io import write_json_atomic
    from moecl.registry import Registry

    params = load_params("params.yaml")
    install(fault)
    held: list[list[float]] = []
    lock = evolve.evolution_lock

    @contextmanager
    def timed_lock(p):
        with lock(p):
            held.append([time.time()])
            try:
                yield
            finally:
                held[-1].append(time.time())

    evolve.evolution_lock = timed_lock
    base = tiny_base()
    print(f"pid {os.getpid()}: evolve_pending with fault {fault}", flush=True)
    outcomes = evolve.evolve_pending(
        params,
        base=base,
        registry=Registry.from_params(params),
        outputs=evolve.Outputs(Path(".")),
        progress=True,
    )
    write_json_atomic(
        result_path,
        {
            "outcomes": [[o.task_id, o.data_version, o.decision, o.version] for o in outcomes],
            "started": started,
            "lock_held": held,
        },
    )
    print(f"pid {os.getpid()}: done", flush=True)


# --- a full disk (in this process) ------------------------------------------------------------------------------------
class DiskFull:
    """A file system under `root` that fills up at the write `strike(what)` picks: that write stores half of its
    bytes and fails with ENOSPC, as a full disk does (the kernel writes what fits; the next write fails).

    Every way this process writes a file is covered while installed: open()/io.open (so Path.write_*, os.fdopen,
    PIL, matplotlib, Evidently: the file object's write stores half, then raises), os.write (the registry's
    appends: like the system call, a short write, then ENOSPC on the next call), and shutil's copies (its
    sendfile fast path is switched off). `what` names a write by its final file, relative to root, whatever temporary name it goes
    through (see `what_of`); `writes` lists every `what` in order of the first write (a run's census).
    """

    def __init__(self, root: Path, strike=None):
        self.root = Path(root).resolve()
        self.strike = strike or (lambda what: False)
        self.writes: list[str] = []
        self.struck: str | None = None

    def _what(self, file) -> str | None:
        try:
            path = Path(os.readlink(f"/proc/self/fd/{file}")) if isinstance(file, int) else Path(file)
            rel = path.resolve().relative_to(self.root)
        except (OSError, ValueError, TypeError):
            return None
        return rel.as_posix()

    def hit(self, rel: str, data) -> bool:
        """Whether this write fails (at most one write does)."""
        what = what_of(rel, data)
        if what not in self.writes:
            self.writes.append(what)
        if self.struck is None and self.strike(what):
            self.struck = what
            return True
        return False

    @contextmanager
    def installed(self):
        import builtins
        import io
        import shutil

        real_open, real_write, sendfile = io.open, os.write, shutil._USE_CP_SENDFILE
        disk = self

        def full_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            rel = disk._what(file) if any(c in mode for c in "wax+") else None
            return _FillingFile(handle, disk, rel) if rel else handle

        full_fds: set[int] = set()

        def full_write(fd, data):  # the system call: a short write, then ENOSPC on the next one
            if fd in full_fds:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            rel = disk._what(fd)
            if rel and disk.hit(rel, data):
                full_fds.add(fd)
                return real_write(fd, bytes(data)[: len(data) // 2])
            return real_write(fd, data)

        builtins.open = io.open = full_open
        os.write, shutil._USE_CP_SENDFILE = full_write, False
        try:
            yield self
        finally:
            builtins.open = io.open = real_open
            os.write, shutil._USE_CP_SENDFILE = real_write, sendfile


class _FillingFile:
    """A file object whose write may hit the full disk; everything else goes to the real one."""

    def __init__(self, handle, disk: DiskFull, rel: str):
        self._handle, self._disk, self._rel = handle, disk, rel

    def write(self, data):
        if self._disk.hit(self._rel, data):
            self._handle.write(data[: len(data) // 2])
            try:
                self._handle.flush()
            except OSError:
                pass
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __iter__(self):
        return iter(self._handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # moecl.io.atomic_path's temporary name
_FOLDER_TMP = re.compile(r"^\..+\.tmp-[0-9a-f]{8}$")  # a bank or snapshot folder being written
_EVENT = re.compile(rb'"event": "(\w+)"')


def what_of(rel: str, data) -> str:
    """The write's final file, with placeholders for names that vary between runs: `<new bank>` (a bank being
    written), `<bank>` (an existing one), `<record>` (a registry record), `<staged copy>/*` (a task folder copied
    as the drift reference); an event appended to the decision log is named with its kind."""
    parts = rel.split("/")
    if parts[0] == "banks" and len(parts) > 2:
        parts[1] = "<new bank>" if _FOLDER_TMP.match(parts[1]) else "<bank>"
    if parts[:2] == ["registry", "versions"]:
        parts[2:] = ["<record>"]
    if parts[:2] == ["registry", "snapshots"] and len(parts) > 3:
        parts[2:] = ["<staged copy>", "*"]
    match = _ATOMIC_TMP.match(parts[-1])
    if match:
        parts[-1] = match["name"]
    what = "/".join(parts)
    if what == "registry/events.jsonl":
        kind = _EVENT.search(data if isinstance(data, (bytes, bytearray)) else str(data).encode())
        what += f" ({kind.group(1).decode() if kind else '?'})"
    return what
