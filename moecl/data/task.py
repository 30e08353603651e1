"""The in-memory form of one task dataset version, as the training and evaluation code consume it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Record:
    text: str
    label: str
    id: str | None = None


@dataclass
class TaskData:
    task_id: str
    labels: list[str]
    train: list[Record]
    test: list[Record]
    instruction: str = ""
    description: str = ""
    positive_label: str | None = None
    dev: list[Record] | None = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_binary(self) -> bool:
        return len(self.labels) == 2

    def content_hash(self) -> str:
        """A hash of everything that defines this task version (labels, instruction, records)."""
        h = hashlib.sha256()
        meta = {"labels": self.labels, "instruction": self.instruction, "positive_label": self.positive_label}
        h.update(json.dumps(meta, sort_keys=True).encode())
        for split_name, split in (("train", self.train), ("test", self.test), ("dev", self.dev or [])):
            h.update(split_name.encode())
            for r in split:
                h.update(json.dumps([r.text, r.label], ensure_ascii=False).encode())
                h.update(b"\n")
        return h.hexdigest()
