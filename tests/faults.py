"""Fault injection for tests/test_reliability.py: the library path (`evolve_pending`) in a separate process, with
a fault installed in THAT process only. Not a test module.

The processes are forked by a multiprocessing "forkserver": a fresh interpreter that imports this module (and so
torch, transformers, Evidently, matplotlib) once; each run is a fork of it, a separate process with its own pid
that the test can SIGKILL, and that starts in well under a second instead of re-importing the stack (tens of
seconds on two busy cores). Nothing of the pytest process (threads, monkeypatches) is inherited.
"""

from __future__ import annotations

import multiprocessing
import os
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
from moecl.model.base import BaseSpec, state_dict_fingerprint
from moecl.testing import tiny_llama, tiny_tokenizer

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


def tiny_base_spec() -> BaseSpec:
    """The same tiny model as the `tiny_base` fixture (fixed seed): banks of a child load in the test process."""
    tok = tiny_tokenizer()
    return BaseSpec(
        "tiny-llama", state_dict_fingerprint(tiny_llama(len(tok))), lambda: (tiny_llama(len(tok)), tok)
    )


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
    base = tiny_base_spec()
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
            "outcomes": [[o.task_id, o.data_hash, o.decision, o.version] for o in outcomes],
            "started": started,
            "lock_held": held,
        },
    )
    print(f"pid {os.getpid()}: done", flush=True)
