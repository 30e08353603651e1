"""Atomic writes: the target is the old file or the whole new one; temporary files never stay."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from moecl.io import atomic_path, json_safe, write_json_atomic, write_text_atomic


def test_write_json_atomic_writes_strict_json(tmp_path):
    path = write_json_atomic(tmp_path / "deep" / "out.json", {"a": math.nan, "b": (1, 2), "c": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": None, "b": [1, 2], "c": "é"}
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write_json_atomic(tmp_path / "out.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_json_safe():
    assert json_safe({"x": [math.inf, 1.5], 2: None}) == {"x": [None, 1.5], "2": None}
    assert json_safe({"p": Path("a/b"), "d": _Point(1.0, math.nan)}) == {
        "p": "a/b",
        "d": {"x": 1.0, "y": None},
    }


@dataclasses.dataclass
class _Point:
    x: float
    y: float


def test_an_exclusive_write_never_replaces_an_existing_file(tmp_path):
    path = tmp_path / "v0001.json"
    write_text_atomic(path, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_text_atomic(path, "second", exclusive=True)
    assert path.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["v0001.json"]
