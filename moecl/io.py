"""The project's file-system and process helpers, each in one place: atomic file and folder writes, a file lock,
the git revision and the environment (what a result was computed with), a free port.

Atomic writes: a reader sees the old file or the whole new one, never a half-written one. Each write goes to a
hidden temporary file in the target's own folder (os.replace is atomic only within one file system), is
flushed and fsynced, and then renamed over the target. On any error the temporary file is removed and the
target is left as it was; an OSError (a full disk: ENOSPC) becomes a WriteError that names what could not be
written and where. Folders are written beside their target under a hidden name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moecl.errors import WriteError


def fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(target: str | os.PathLike, cause: OSError, what: str = "", after: str = "") -> WriteError:
    """The WriteError for `cause` while writing `target` (`what` it is, e.g. "the champion pointer").
    `after` replaces the default closing sentence (that `target` is as it was)."""
    if isinstance(cause, WriteError):
        return cause
    reason = cause.strerror or str(cause) or type(cause).__name__
    if cause.errno == errno.ENOSPC:
        reason += " (the disk is full: free space there, then run again)"
    label = f"{what} {target}" if what else str(target)
    return WriteError(
        cause.errno,
        f"could not write {label}: {reason}. "
        + (after or f"Nothing was half-written: {target} is as it was."),
    )


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "", exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; whatever the block writes there replaces `path` on success.

    For writers that want a file name rather than a file object (matplotlib's savefig, Evidently's
    save_html). The temporary name starts with a dot and ends in .tmp, so globs for the real name miss it.
    An OSError raised meanwhile (ENOSPC...) becomes a WriteError naming `what` and `path`. `exclusive`: create
    `path` only if it does not exist (a hard link, atomic too), else FileExistsError and nothing written.
    """
    target = Path(path)
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        # mkstemp creates 0600; keep an existing file's mode, else the usual 0644.
        os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o644)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if exclusive:
            os.link(tmp, target)  # FileExistsError if another writer took the name
            _remove(tmp)
        else:
            os.replace(tmp, target)
    except FileExistsError:
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise write_error(target, exc, what) from exc
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(target.parent)


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def write_bytes_atomic(path: str | os.PathLike, data: bytes, what: str = "", exclusive: bool = False) -> Path:
    with atomic_path(path, what, exclusive) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str, what: str = "", exclusive: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), what, exclusive)


def json_safe(obj: Any) -> Any:
    """Plain JSON: NaN and infinities become null (strict JSON has no NaN), dataclasses dicts, paths strings,
    tuples lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2, what: str = "") -> Path:
    """Write `obj` as strict JSON (NaN -> null), UTF-8, with a trailing newline, atomically."""
    text = json.dumps(json_safe(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text_atomic(path, text + "\n", what)


# --- folders ------------------------------------------------------------------------------------------------------
def path_beside(dest: Path, kind: str = "tmp") -> Path:
    """A hidden, unused name next to dest, `.<name>.<kind>-<8 hex>` (same file system, so a rename into place is
    atomic)."""
    return dest.parent / f".{dest.name}.{kind}-{uuid.uuid4().hex[:8]}"


def temp_folder_beside(dest: Path) -> Path:
    """A new, hidden, empty folder next to dest (`path_beside`), its parents made where missing."""
    tmp = path_beside(dest)
    tmp.mkdir(parents=True)
    return tmp


def install_folder(tmp: Path, dest: Path) -> None:
    """Move a finished folder into place: a rename when dest is absent, else old away, new in, old deleted."""
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = path_beside(dest, "old")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def copy_folder_atomic(src: Path, dest: Path, what: str = "", after: str = "") -> Path:
    """Copy the folder `src` to `dest` so that dest appears whole or not at all (a copy beside it, then
    `install_folder`). An OSError (a full disk) removes the copy and raises a WriteError naming dest."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_beside(dest)  # (copytree makes the folder itself)
    try:
        _copy_tree(Path(src), tmp)
        install_folder(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(dest, exc, what, after) from exc
    return dest


def _copy_tree(src: Path, dst: Path) -> None:
    """shutil.copytree, raising the first file's OSError itself (copytree folds them into one shutil.Error
    whose errno is gone)."""
    failures: list[OSError] = []

    def copy(a, b):
        try:
            return shutil.copy2(a, b)
        except OSError as exc:
            failures.append(exc)
            raise

    try:
        shutil.copytree(src, dst, copy_function=copy)
    except shutil.Error:
        if failures:
            raise failures[0] from None
        raise


# --- the process's surroundings -----------------------------------------------------------------------------------
@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if absent), blocking until it is free; the OS releases it
    if the holder dies. Without fcntl (Windows) there is no lock: single-writer use only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def git_revision(cwd: str | os.PathLike | None = None) -> str | None:
    """The commit checked out in `cwd` (default: the working directory), or None outside a git repository."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """The machine and the library versions that a model or a figure depends on: CPU, torch threads, Python,
    platform, torch, transformers, peft, tokenizers, and CUDA with the first GPU where torch sees one."""
    import importlib.metadata
    import platform

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    models = [x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name")]
    info = {"cpu": models[0] if models else platform.processor() or platform.machine()}
    info |= {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info |= {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__}
    for package in ("transformers", "peft", "tokenizers"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    if torch.cuda.is_available():
        info |= {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a local server or a distributed launch)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
