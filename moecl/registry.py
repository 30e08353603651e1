"""The model registry: immutable bank versions, an append-only decision log, and the champion pointer.

Layout under the registry root (params `registry.root`, default `registry/`):

- `versions/<version>.json` - one record per bank version ("v0001", "v0002", ...), written once and never
  changed: lineage (bank_dir, parent_version, task_id, data_version, data_hashes, params, code_revision,
  flow_run_id) plus the evaluation metrics and the gate's verdict. The record is written to a temporary file,
  fsynced, then hard-linked to its final name: the link fails if the name exists, so two processes can never
  take the same id, and a reader never sees a half-written record.
- `events.jsonl` - one JSON event per line (registered / promoted / rejected / rolled_back, and failed: a
  dataset version whose run was refused, e.g. for the reason "integrity"), each appended with O_APPEND writes
  and fsync; a failed append (a full disk) takes its partial line back. A version's status is derived from
  these events, never stored in its record. A torn (unparsable) line left by a crash is ignored.
- `champion.json` - {"version": ..., "previous": [older champions, most recent first]}, replaced atomically
  with os.replace, so a crash leaves the old or the new champion, never a mix. Promotion and rollback hold an
  advisory lock (`.lock`) so two of them cannot interleave. Both refuse a bank that fails verification
  (moecl.integrity: every file's sha256): a corrupted bank never becomes the champion.

`bank_dir` is stored relative to the project root (by default the registry root's parent) when the bank
lies under it, so a project folder can move or be cloned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moecl.errors import IntegrityError, MoeclError, WriteError
from moecl.integrity import verify_bank
from moecl.io import (
    file_lock,
    git_revision,
    json_safe,
    write_error,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

GTO_ARTIFACT = "moecl-bank"
GTO_STAGE = "prod"
STATUSES = ("candidate", "promoted", "rejected", "rolled_back")
EVENTS = ("registered", "promoted", "rejected", "rolled_back", "failed")
DONE_STATUSES = ("promoted", "rejected", "rolled_back")  # a dataset version that reached one was processed
_VERSION_RE = re.compile(r"^v(\d+)$")


class RegistryError(MoeclError):
    """An unknown version, a missing bank, no champion to roll back to, or a malformed registry file."""


@dataclass
class VersionRecord:
    version: str
    created_at: str
    bank_dir: str
    parent_version: str | None = None
    task_id: str | None = None
    data_version: str | None = None  # task_folder_hash of the task folder: the dataset version trained
    # task -> TaskData.content_hash() of the data each of the bank's experts was trained on (its bank.json
    # tasks[*].data_hash); a content hash, not a dataset version. The name is the stored record's key.
    data_hashes: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    code_revision: str | None = None
    # the machine and library versions that trained it (moecl.io.environment(), from the bank's lineage)
    environment: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    flow_run_id: str | None = None
    status: str = "candidate"  # derived from events.jsonl when read; not part of the stored record

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VersionRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def normalize_version(version: str | int) -> str:
    """'3', 'v3' and 'v0003' all name v0003; anything else (a path, an empty string) is an error."""
    text = str(version).strip()
    match = _VERSION_RE.match(text) or _VERSION_RE.match(f"v{text}")
    if not match:
        raise RegistryError(f"{version!r} is not a registry version (expected e.g. v0003)")
    return f"v{int(match.group(1)):04d}"


def is_version_id(text: object) -> bool:
    """Whether `text` is a version id as stored (e.g. "v0003")."""
    return isinstance(text, str) and _VERSION_RE.match(text) is not None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(json_safe(obj), indent=indent, sort_keys=indent is not None, allow_nan=False)


def _take_back(fd: int, size: int, written: int) -> None:
    """Cut a partial append off again (only if nothing else was appended after it)."""
    try:
        if written and os.fstat(fd).st_size == size + written:
            os.ftruncate(fd, size)
            os.fsync(fd)
    except OSError:
        pass


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path}: cannot read registry file: {exc}") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: expected a JSON object")
    return data


class Registry:
    def __init__(self, root: str | Path, project_root: str | Path | None = None, gto_mirror: bool = False):
        self.root = Path(root)
        self.project_root = Path(project_root) if project_root is not None else self.root.resolve().parent
        self.gto_mirror = gto_mirror

    @classmethod
    def from_params(cls, params: Any, project_root: str | Path | None = None) -> Registry:
        base = Path(project_root) if project_root is not None else Path.cwd()
        root = Path(params.registry.root)
        return cls(root if root.is_absolute() else base / root, base, params.registry.gto_mirror)

    # -- paths ---------------------------------------------------------------------------------------------
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def champion_path(self) -> Path:
        return self.root / "champion.json"

    def _record_path(self, version: str) -> Path:
        return self.versions_dir / f"{version}.json"

    def bank_path(self, record: VersionRecord) -> Path:
        bank = Path(record.bank_dir)
        return bank if bank.is_absolute() else self.project_root / bank

    def _stored_bank_dir(self, bank_dir: Path) -> str:
        resolved = bank_dir.resolve()
        try:
            return resolved.relative_to(self.project_root.resolve()).as_posix()
        except ValueError:
            return str(resolved)

    # -- writing -------------------------------------------------------------------------------------------
    def register(
        self,
        bank_dir: str | Path,
        *,
        parent_version: str | None = None,
        task_id: str | None = None,
        data_version: str | None = None,
        data_hashes: dict[str, str] | None = None,
        params: Any = None,
        code_revision: str | None = None,
        environment: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        gate: dict[str, Any] | None = None,
        flow_run_id: str | None = None,
    ) -> VersionRecord:
        """Record a new bank version (a challenger) under the next free id; returns it as a candidate."""
        bank_dir = Path(bank_dir)
        if not bank_dir.is_dir():
            raise RegistryError(f"cannot register {bank_dir}: not a directory")
        if parent_version is not None:
            parent_version = normalize_version(parent_version)
        if params is not None and hasattr(params, "to_dict"):
            params = params.to_dict()
        fields = {
            "created_at": _now(),
            "bank_dir": self._stored_bank_dir(bank_dir),
            "parent_version": parent_version,
            "task_id": task_id,
            "data_version": data_version,
            "data_hashes": dict(data_hashes or {}),
            "params": params or {},
            "code_revision": code_revision or git_revision(self.project_root),
            "environment": dict(environment or {}),
            "metrics": metrics or {},
            "gate": gate or {},
            "flow_run_id": None if flow_run_id is None else str(flow_run_id),
        }
        _dumps(fields)  # fail on unserialisable lineage before anything is written
        number = self._last_number() + 1
        while True:
            record = VersionRecord(version=f"v{number:04d}", **fields)
            stored = {k: v for k, v in record.to_dict().items() if k != "status"}
            path = self._record_path(record.version)
            what = f"the registry record of {record.version}"
            try:  # exclusive: fails if another process took this id
                write_text_atomic(path, _dumps(stored) + "\n", what, exclusive=True)
            except FileExistsError:
                number = max(number + 1, self._last_number() + 1)
                continue
            break
        try:
            self._append_event("registered", record.version)
        except WriteError:
            path.unlink(missing_ok=True)  # unregistered again: the version id stays free, nothing changed
            raise
        return record

    def record_rejection(self, version: str, reasons: list[str] | str | None = None) -> VersionRecord:
        """Log the gate's rejection of a challenger; the champion is untouched."""
        record = self.get(version)
        if self._champion_state().get("version") == record.version:
            raise RegistryError(f"{record.version} is the champion: roll back instead of rejecting it")
        reasons = [reasons] if isinstance(reasons, str) else list(reasons or [])
        self._append_event("rejected", record.version, reason="; ".join(reasons), reasons=reasons)
        record.status = "rejected"
        return record

    def record_failure(self, task_id: str, data_version: str, reason: str, detail: str = "") -> None:
        """Log that a run could not process a dataset version (`reason`, e.g. "integrity"). It stays pending:
        a failure is not a decision, the next run tries the version again."""
        self._append_event(
            "failed", None, task_id=task_id, data_version=data_version, reason=reason, detail=detail
        )

    def failures(self, task_id: str | None = None, data_version: str | None = None) -> list[dict[str, Any]]:
        """The `failed` events, oldest first (optionally of one task and dataset version)."""
        return [
            e
            for e in self.history_events()
            if e.get("event") == "failed"
            and task_id in (None, e.get("task_id"))
            and data_version in (None, e.get("data_version"))
        ]

    def verified_bank(self, record: VersionRecord, action: str) -> Path:
        """The bank of `record`, checked file by file (IntegrityError, naming `action`, if it is not whole)."""
        bank = self.bank_path(record)
        if not bank.is_dir():
            raise RegistryError(f"cannot {action} {record.version}: its bank {bank} is missing")
        try:
            verify_bank(bank)
        except IntegrityError as exc:
            raise IntegrityError(f"cannot {action} {record.version}: {exc}") from None
        return bank

    def promote(self, version: str, reason: str = "") -> VersionRecord:
        """Make `version` the champion; the old champion heads the `previous` list."""
        record = self.get(version)
        if self._champion_state().get("version") == record.version:
            raise RegistryError(f"{record.version} is already the champion")
        self.verified_bank(record, "promote")
        with self._lock():
            state = self._champion_state()
            old = state.get("version")
            if old == record.version:
                raise RegistryError(f"{record.version} is already the champion")
            previous = [v for v in [old, *state.get("previous", [])] if v and v != record.version]
            self._write_champion(record.version, previous)
            self._append_after_champion("promoted", record.version, reason=reason, replaced=old)
        record.status = "promoted"
        if self.gto_mirror:
            self._mirror_to_gto(record, reason)
        return record

    def rollback(self, reason: str = "") -> VersionRecord:
        """Restore the previous champion; returns its record."""
        self._rollback_plan()  # check before taking the lock, so a refused rollback writes nothing
        with self._lock():
            current, restored, rest = self._rollback_plan()
            self._write_champion(restored.version, rest)
            self._append_after_champion("rolled_back", current, reason=reason, to=restored.version)
        restored.status = "promoted"
        if self.gto_mirror:
            self._mirror_to_gto(restored, reason or f"rollback from {current}")
        return restored

    def _rollback_plan(self) -> tuple[str, VersionRecord, list[str]]:
        state = self._champion_state()
        current, previous = state.get("version"), list(state.get("previous", []))
        if not current:
            raise RegistryError("no champion to roll back")
        if not previous:
            raise RegistryError(f"cannot roll back: {current} is the only champion there has been")
        restored = self.get(previous[0])
        self.verified_bank(restored, "roll back to")
        return current, restored, previous[1:]

    # -- reading -------------------------------------------------------------------------------------------
    def get(self, version: str) -> VersionRecord:
        version = normalize_version(version)
        path = self._record_path(version)
        if not path.exists():
            raise RegistryError(f"unknown version {version} (no {path})")
        record = VersionRecord.from_dict(_read_json(path))
        record.status = self._statuses().get(version, "candidate")
        return record

    def list_versions(self) -> list[VersionRecord]:
        """Every version, oldest first, with its derived status."""
        statuses = self._statuses()
        records = []
        for _number, path in self._record_files():
            record = VersionRecord.from_dict(_read_json(path))
            record.status = statuses.get(record.version, "candidate")
            records.append(record)
        return records

    def champion(self) -> VersionRecord | None:
        version = self._champion_state().get("version")
        return self.get(version) if version else None

    def champion_bank(self) -> Path | None:
        record = self.champion()
        return self.bank_path(record) if record else None

    def processed(self, task_id: str, data_version: str) -> VersionRecord | None:
        """The newest version of `task_id` built from `data_version` that was decided (promoted, rejected or
        rolled back), so a rerun on the same dataset version can do nothing; None if there is none. A record
        whose per-task hashes (`data_hashes`) name the hash counts too."""
        for record in reversed(self.list_versions()):
            if record.task_id != task_id or record.status not in DONE_STATUSES:
                continue
            if data_version in (record.data_version, record.data_hashes.get(task_id)):
                return record
        return None

    def undecided(
        self, task_id: str, data_version: str, bank_dir: str | Path, parent_version: str | None
    ) -> VersionRecord | None:
        """The candidate left by a run killed between registering a challenger and promoting or rejecting it:
        same task, dataset version, bank and parent, never decided. The next run decides that record instead
        of registering the same bank a second time; None if there is none."""
        stored = self._stored_bank_dir(Path(bank_dir))
        for record in reversed(self.list_versions()):
            if (
                record.status == "candidate"
                and record.task_id == task_id
                and record.data_version == data_version
                and record.bank_dir == stored
                and record.parent_version == parent_version
            ):
                return record
        return None

    def history_events(self, version: str | None = None) -> list[dict[str, Any]]:
        """The decision log, oldest first (optionally one version's events); torn lines are skipped."""
        if not self.events_path.exists():
            return []
        lines = self.events_path.read_text(encoding="utf-8").split("\n")
        events = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                if i < len(lines) - 1:  # the last line may be torn by a crash; anything else deserves a word
                    log.warning("%s:%d: skipping an unreadable event line", self.events_path, i + 1)
                continue
            if isinstance(event, dict) and (version is None or event.get("version") == version):
                events.append(event)
        return events

    # -- internals -----------------------------------------------------------------------------------------
    def _record_files(self) -> list[tuple[int, Path]]:
        if not self.versions_dir.is_dir():
            return []
        found = []
        for path in self.versions_dir.glob("v*.json"):
            match = _VERSION_RE.match(path.stem)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def _last_number(self) -> int:
        files = self._record_files()
        return files[-1][0] if files else 0

    def _statuses(self) -> dict[str, str]:
        statuses: dict[str, str] = {}
        for event in self.history_events():
            kind, version = event.get("event"), event.get("version")
            if kind == "promoted" or kind == "rejected" or kind == "rolled_back":
                statuses[version] = kind
            elif kind == "registered":
                statuses.setdefault(version, "candidate")
        champion = self._champion_state().get("version")
        if champion:  # champion.json is the truth even if a crash lost the promotion's event
            statuses[champion] = "promoted"
        return statuses

    def _champion_state(self) -> dict[str, Any]:
        if not self.champion_path.exists():
            return {}
        state = _read_json(self.champion_path)
        if not isinstance(state.get("previous", []), list):
            raise RegistryError(f"{self.champion_path}: 'previous' must be a list")
        return state

    def _write_champion(self, version: str, previous: list[str]) -> None:
        state = {"version": version, "previous": previous}
        write_json_atomic(self.champion_path, state, what="the champion pointer")

    def _append_after_champion(self, kind: str, version: str, **details: Any) -> None:
        """The event of a champion change that champion.json already holds: if it cannot be appended, the
        change stands (champion.json is the truth) and the error says so."""
        try:
            self._append_event(kind, version, **details)
        except WriteError as exc:
            champion = self._champion_state().get("version")
            raise WriteError(
                exc.errno,
                f"{exc} The champion is {champion} nonetheless ({self.champion_path} was replaced first); "
                f"only the {kind!r} line of {version} is missing from the log.",
            ) from exc

    def _append_event(self, kind: str, version: str | None, **details: Any) -> None:
        event = {"event": kind, "version": version, "time": _now(), **details}
        data = (_dumps(event, indent=None) + "\n").encode("utf-8")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.events_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(self.events_path, exc, "the decision log") from exc
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a crash left a torn line: start ours on a fresh one
            written = 0
            try:
                while written < len(data):  # a full disk may take part of a write, then fail the rest
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError as exc:
                _take_back(fd, size, written)
                raise write_error(self.events_path, exc, f"the {kind!r} event to the decision log") from exc
        finally:
            os.close(fd)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """An advisory lock around champion changes (released by the OS if the holder dies)."""
        with file_lock(self.root / ".lock"):
            yield

    def _mirror_to_gto(self, record: VersionRecord, reason: str) -> None:
        """Best effort: assign GTO stage `prod` of artifact `moecl-bank` to the commit that built `record`.

        GTO versions are per git commit (GTO registers one on first assignment), so several registry
        versions built from one commit share a GTO version; the tag message names the registry version.
        """
        if git_revision(self.project_root) is None:
            log.warning("gto mirror skipped: %s is not a git repository with commits", self.project_root)
            return
        message = f"moecl {record.version}" + (f": {reason}" if reason else "")
        try:
            from gto import api as gto_api

            gto_api.assign(
                str(self.project_root),
                GTO_ARTIFACT,
                GTO_STAGE,
                ref=record.code_revision or "HEAD",
                message=message,
                force=True,
            )
        except Exception as exc:  # the mirror must never break a promotion
            log.warning("gto mirror of %s failed: %s", record.version, exc)
