"""The model registry: ids, the decision log, the champion pointer, crash safety and the CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moecl.cli import main
from moecl.registry import Registry, RegistryError, normalize_version
from moecl.testing import stub_bank


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text("registry:\n  root: registry\n")
    return tmp_path


@pytest.fixture
def registry(project: Path) -> Registry:
    return Registry(project / "registry")


def _snapshot(root: Path) -> dict[str, bytes]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_register_promote_rollback_cycle(project: Path, registry: Registry) -> None:
    assert registry.champion() is None and registry.champion_bank() is None
    a = registry.register(
        stub_bank(project, "a"),
        task_id="t1",
        data_version="h1",
        data_hashes={"t1": "h1"},
        params={"train": {"epochs": 1}},
        metrics={"acc": 0.8, "bwt": float("nan")},
        gate={"decision": "promote", "reasons": []},
        flow_run_id="run-1",
    )
    assert a.version == "v0001" and a.status == "candidate" and a.bank_dir == "banks/a"
    stored = json.loads((project / "registry/versions/v0001.json").read_text())
    assert "status" not in stored and stored["metrics"]["bwt"] is None and stored["task_id"] == "t1"

    registry.promote(a.version, reason="first")
    assert registry.champion().version == "v0001"
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote("v1")
    assert registry.champion_bank() == project / "banks/a"

    b = registry.register(stub_bank(project, "b"), task_id="t2", data_version="h2", parent_version="v0001")
    assert b.version == "v0002" and b.parent_version == "v0001"
    registry.promote("2")
    assert json.loads(registry.champion_path.read_text()) == {"version": "v0002", "previous": ["v0001"]}
    assert [r.status for r in registry.list_versions()] == ["promoted", "promoted"]

    restored = registry.rollback(reason="bad")
    assert restored.version == "v0001" and registry.champion().version == "v0001"
    assert {r.version: r.status for r in registry.list_versions()} == {
        "v0001": "promoted",
        "v0002": "rolled_back",
    }
    assert [e["event"] for e in registry.history_events()] == [
        "registered",
        "promoted",
        "registered",
        "promoted",
        "rolled_back",
    ]
    with pytest.raises(RegistryError, match="only champion"):
        registry.rollback()


def test_rejection_leaves_the_champion_and_processed_finds_it(project: Path, registry: Registry) -> None:
    a = registry.register(stub_bank(project, "a"), task_id="t1", data_version="h1")
    registry.promote(a.version)
    champion_before = registry.champion_path.read_bytes()
    b = registry.register(stub_bank(project, "b"), task_id="t1", data_hashes={"t1": "h2"})
    assert registry.processed("t1", "h2") is None  # a candidate is not a decision yet
    registry.record_rejection(b.version, ["bwt below -0.05"])
    assert registry.champion_path.read_bytes() == champion_before
    assert registry.get(b.version).status == "rejected"
    assert registry.processed("t1", "h2").version == b.version
    assert registry.processed("t1", "h1").version == a.version
    assert registry.processed("t2", "h1") is None and registry.processed("t1", "h3") is None
    assert registry.history_events(b.version)[-1]["reasons"] == ["bwt below -0.05"]
    with pytest.raises(RegistryError, match="champion"):
        registry.record_rejection(a.version, "no")


def test_promote_unknown_or_missing_bank_writes_nothing(project: Path, registry: Registry) -> None:
    with pytest.raises(RegistryError, match="unknown version v0007"):
        registry.promote("v0007")
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()
    assert not registry.root.exists()

    bank = stub_bank(project, "a")
    registry.register(bank)
    (bank / "bank.json").unlink()
    bank.rmdir()
    before = _snapshot(registry.root)
    with pytest.raises(RegistryError, match="missing"):
        registry.promote("v0001")
    with pytest.raises(RegistryError):
        registry.promote("../../etc/passwd")
    assert _snapshot(registry.root) == before
    with pytest.raises(RegistryError, match="not a directory"):
        registry.register(project / "nowhere")


def test_torn_last_event_line_is_ignored_and_the_next_append_is_clean(
    project: Path, registry: Registry
) -> None:
    a = registry.register(stub_bank(project, "a"), task_id="t1", data_version="h1")
    registry.promote(a.version)
    with open(registry.events_path, "a") as fh:
        fh.write('{"event": "rejected", "version": "v00')  # a crash mid-write
    assert registry.get("v0001").status == "promoted"
    assert len(registry.history_events()) == 2
    b = registry.register(stub_bank(project, "b"))
    assert registry.get(b.version).status == "candidate"
    assert [e["event"] for e in registry.history_events()] == ["registered", "promoted", "registered"]


def _register_one(root: str, bank: str) -> str:
    return Registry(root).register(bank).version


def test_version_ids_are_unique_under_concurrency(project: Path, registry: Registry) -> None:
    bank = stub_bank(project, "shared")
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        versions = pool.starmap(_register_one, [(str(registry.root), str(bank))] * 8)
    assert sorted(versions) == [f"v{i:04d}" for i in range(1, 9)]
    assert [r.version for r in registry.list_versions()] == sorted(versions)
    assert len([e for e in registry.history_events() if e["event"] == "registered"]) == 8
    assert not list(registry.versions_dir.glob(".tmp-*"))


def test_crash_during_promotion_leaves_old_champion(project: Path, registry: Registry, monkeypatch) -> None:
    a = registry.register(stub_bank(project, "a"))
    b = registry.register(stub_bank(project, "b"))
    registry.promote(a.version)

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.promote(b.version)
    monkeypatch.undo()
    assert json.loads(registry.champion_path.read_text()) == {"version": "v0001", "previous": []}
    assert registry.get(b.version).status == "candidate"
    assert not list(registry.root.glob(".*tmp*"))


_KILLED_PROMOTION = """
import os, sys
from moecl.registry import Registry
real_replace = os.replace
def replace_then_die(src, dst):
    real_replace(src, dst)
    os._exit(9)  # killed after the pointer moved, before the event was logged
os.replace = replace_then_die
Registry(sys.argv[1]).promote(sys.argv[2])
"""


def test_killed_promotion_leaves_a_valid_champion(project: Path, registry: Registry) -> None:
    a = registry.register(stub_bank(project, "a"))
    b = registry.register(stub_bank(project, "b"))
    registry.promote(a.version)
    proc = subprocess.run([sys.executable, "-c", _KILLED_PROMOTION, str(registry.root), b.version])
    assert proc.returncode == 9
    state = json.loads(registry.champion_path.read_text())
    assert state in ({"version": "v0001", "previous": []}, {"version": "v0002", "previous": ["v0001"]})
    assert registry.champion().status == "promoted"  # champion.json wins over a lost event


def test_normalize_version() -> None:
    assert normalize_version("3") == normalize_version("v3") == normalize_version("v0003") == "v0003"
    for bad in ("", "v", "x3", "v3.json", "../v3"):
        with pytest.raises(RegistryError):
            normalize_version(bad)


def test_gto_mirror_tags_prod_and_never_breaks_promotion(project: Path, monkeypatch) -> None:
    registry = Registry(project / "registry", gto_mirror=True)
    bank = stub_bank(project, "a")
    registry.promote(registry.register(bank).version)  # not a git repo: a warning, still promoted
    assert registry.champion().version == "v0001"

    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "t")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "t@example.com")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "init"], cwd=project, check=True)
    b = registry.register(stub_bank(project, "b"))
    assert b.code_revision
    registry.promote(b.version)
    tags = subprocess.run(["git", "tag"], cwd=project, capture_output=True, text=True).stdout.split()
    assert "moecl-bank#prod#1" in tags


def test_cli_list_show_promote_rollback(project: Path, registry: Registry, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    assert main(["registry", "list"]) == 0
    assert "no versions" in capsys.readouterr().out
    registry.register(
        stub_bank(project, "a"), task_id="t1", data_version="h1", metrics={"acc": 0.75, "bwt": -0.01}
    )
    registry.register(stub_bank(project, "b"), task_id="t2", data_version="h2", metrics={"acc": 0.7})

    assert main(["promote", "v0001"]) == 0
    assert main(["promote", "2", "--reason", "gate passed"]) == 0
    capsys.readouterr()
    assert main(["registry", "list"]) == 0
    out = capsys.readouterr().out
    assert "VERSION" in out and "0.7500" in out and "-0.0100" in out
    assert re.search(r"^\*\s+v0002\s", out, re.M) and not re.search(r"^\*\s+v0001", out, re.M)
    assert main(["registry", "list", "--json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["promoted", "promoted"]
    assert main(["registry", "show", "v0002"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["is_champion"] and shown["events"][-1]["reason"] == "gate passed"

    assert main(["rollback"]) == 0
    assert "v0001" in capsys.readouterr().out
    before = _snapshot(registry.root)
    assert main(["promote", "v0009"]) == 2
    assert main(["rollback"]) == 2
    assert main(["registry", "show", "nope"]) == 2
    assert "error:" in capsys.readouterr().err
    assert _snapshot(registry.root) == before
