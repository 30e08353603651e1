"""bank.json as a typed object: what a bank records about itself, read once and then used by attribute.

The JSON stays exactly what moecl.bank.save_bank writes and moecl.integrity checks (formats moecl-bank/1 and
/2); this module only gives the checked JSON names and types, so no caller indexes `manifest["lineage"]`, and a
section of the wrong type fails here, naming the file, rather than deep inside a load.

Two hashes describe a task's data, and they are not the same thing:
- the data VERSION (`data_version`): moecl.data.validate.task_folder_hash of the task folder's bytes, the
  registry's identity of a dataset version (what `Registry.processed` looks up);
- the data CONTENT hash (`content_hash`): TaskData.content_hash() of the parsed labels and records, what a step
  trained on. bank.json stores it under the older key "data_hash" (tasks[*] and lineage); the key stays, so
  every bank already written still reads.

No torch here: the registry and the CLI read manifests without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moecl.config import LoraSettings, MethodConfig
from moecl.errors import IntegrityError

CONTENT_HASH_KEY = "data_hash"  # bank.json's (historical) key for TaskData.content_hash()


@dataclass(frozen=True)
class BaseModelRef:
    """The backbone a bank was built on; a bank only loads on a base with this sha256."""

    name: str
    sha256: str


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file of the bank and the sha256 it was written with."""

    file: str
    sha256: str


@dataclass(frozen=True)
class TaskEntry:
    """One task the bank knows: its labels and prompt, its expert's file, the data it was trained on."""

    task_id: str
    labels: list[str]
    file: str
    sha256: str
    instruction: str = ""
    positive_label: str | None = None
    mode: str | None = None
    content_hash: str | None = None  # JSON key "data_hash": TaskData.content_hash() of its last training data


@dataclass(frozen=True)
class Lineage:
    """Where the bank came from: its parent, the task this step trained, on which data, with which params."""

    parent: str | None = None
    trained_task: str | None = None
    code_revision: str | None = None
    environment: dict[str, Any] = field(default_factory=dict)  # moecl.io.environment() of the step's process
    content_hash: str | None = None  # JSON key "data_hash": TaskData.content_hash() of the trained task
    data_version: str | None = None  # task_folder_hash of that task's folder, when a registry run trained it
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BankManifest:
    """A bank's bank.json, checked (moecl.integrity) and typed. `history` and `train` keep their JSON shape:
    the accuracy history (matrix, before_training, zero_shot, stripping_rate) and the step's training summary."""

    format: str
    base_model: BaseModelRef
    method: MethodConfig
    lora: LoraSettings
    tasks: list[TaskEntry]
    steps: list[str]
    lineage: Lineage
    shared: TensorFile | None = None
    mode: str | None = None
    history: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    manifest_sha256: str | None = None  # its own checksum (moecl-bank/2); None in a moecl-bank/1 manifest

    @property
    def task_ids(self) -> list[str]:
        """The tasks the bank knows, in learning order."""
        return [t.task_id for t in self.tasks]

    def task(self, task_id: str) -> TaskEntry | None:
        return next((t for t in self.tasks if t.task_id == task_id), None)

    @classmethod
    def from_json(cls, raw: dict[str, Any], path: str | Path) -> BankManifest:
        """The typed manifest of JSON that moecl.integrity has checked; IntegrityError (naming `path`) if a
        section does not fit its type, e.g. a moecl-bank/1 manifest that no checksum protects."""
        try:
            shared = raw.get("shared")
            return cls(
                format=raw["format"],
                base_model=BaseModelRef(raw["base_model"]["name"], raw["base_model"]["sha256"]),
                method=MethodConfig.from_manifest(raw["method"]),
                lora=LoraSettings(**raw["lora"]),
                tasks=[_task_entry(t) for t in raw["tasks"]],
                steps=list(raw["steps"]),
                lineage=_lineage(raw["lineage"]),
                shared=TensorFile(shared["file"], shared["sha256"]) if shared else None,
                mode=raw.get("mode"),
                history=dict(raw.get("history") or {}),
                train=dict(raw.get("train") or {}),
                manifest_sha256=raw.get("manifest_sha256"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"{path}: the manifest does not fit its schema ({exc!r})") from None


def _task_entry(raw: dict[str, Any]) -> TaskEntry:
    return TaskEntry(
        task_id=raw["task_id"],
        labels=list(raw["labels"]),
        file=raw["file"],
        sha256=raw["sha256"],
        instruction=raw.get("instruction", ""),
        positive_label=raw.get("positive_label"),
        mode=raw.get("mode"),
        content_hash=raw.get(CONTENT_HASH_KEY),
    )


def _lineage(raw: dict[str, Any]) -> Lineage:
    return Lineage(
        parent=raw.get("parent"),
        trained_task=raw.get("trained_task"),
        code_revision=raw.get("code_revision"),
        environment=dict(raw.get("environment") or {}),
        content_hash=raw.get(CONTENT_HASH_KEY),
        data_version=raw.get("data_version"),
        params=dict(raw.get("params") or {}),
    )
