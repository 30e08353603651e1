"""A full disk (ENOSPC) at each write of a self-evolution run, injected by tests/faults.py's DiskFull: the failing
write stores half of its bytes, then fails, as a full disk does. At every such write:

- the run stops with a WriteError (errno ENOSPC) that says what could not be written and where;
- nothing is half-written: no temporary file or folder stays, the file being written is as it was before;
- the champion stays (only the very last write, the decision log's "promoted" line, comes after the new
  champion is in place: then the new champion stands, whole, and the error says so);
- the next run goes on from there, and the version is registered and decided exactly once.

Plus the same for the writes each module does on its own (io, bank, registry), where the failure is easy to aim.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from moecl.errors import WriteError
from moecl.registry import Registry
from moecl.testing import (
    assert_consistent,
    decisions,
    land,
    run_library,
    sentiment_task,
    stub_bank,
    tree,
    workspace_params,
)
from tests.faults import DiskFull

# the workspaces of tests/conftest.py: champion v0001 knows `topics`; each test works on a copy
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENOSPC = "No space left on device"
TEMPORARY = re.compile(r"\.tmp($|-)|\.staged-|\.old-")  # what an interrupted write would leave behind


def _debris(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if TEMPORARY.search(p.name)]


def _target_named(what: str, message: str) -> bool:
    """Whether the error names the file `what` stands for (its folder and its final name)."""
    folder, _, rest = what.partition("/")
    name = rest.split(" (")[0].split("/")[-1]
    if name == "<record>":
        return re.search(r"registry/versions/v\d{4}\.json", message) is not None
    if name == "*":  # a file of the drift reference's staged copy
        return (
            "registry/snapshots/.sentiment.staged-" in message and "drift reference of sentiment" in message
        )
    return f"{folder}/" in message and name in message


def test_enospc_at_each_write_of_a_run_leaves_nothing_half_written_and_the_version_is_decided_once(
    ws, tiny_base, tmp_path
):
    params = workspace_params()
    land(ws, sentiment_task())

    # the census: every file a run writes, in order, from a clean run on a copy of the workspace
    census_ws = tmp_path / "census"
    shutil.copytree(ws, census_ws, symlinks=True)
    disk = DiskFull(census_ws)
    os.chdir(census_ws)
    try:
        with disk.installed():
            assert [o.decision for o in run_library(params, tiny_base)] == ["promote"]
    finally:
        os.chdir(ws)
    writes = disk.writes
    expected = {
        "reports/drift-sentiment.html",
        "metrics/drift.json",
        "banks/<new bank>/expert-sentiment.safetensors",
        "banks/<new bank>/shared.safetensors",
        "banks/<new bank>/bank.json",
        "banks/<bank>/evaluation.json",
        "metrics/cl.json",
        "plots/accuracy_matrix.png",
        "metrics/gate.json",
        "registry/versions/<record>",
        "registry/events.jsonl (registered)",
        "registry/snapshots/<staged copy>/*",
        "registry/champion.json",
        "registry/events.jsonl (promoted)",
    }
    assert expected <= set(writes), writes
    assert writes[-1] == "registry/events.jsonl (promoted)"

    champion_file = ws / "registry" / "champion.json"
    old_champion = champion_file.read_bytes()
    struck = []
    for what in writes:  # in run order: each run stops at the next write not yet struck
        before = tree(ws)
        disk = DiskFull(ws, strike=lambda w, what=what: w == what)
        with disk.installed(), pytest.raises(WriteError) as caught:
            run_library(params, tiny_base)
        assert disk.struck == what
        struck.append(what)
        error = caught.value
        assert error.errno == errno.ENOSPC and isinstance(error, OSError)
        message = str(error)
        assert message.startswith("could not write ") and ENOSPC in message, message
        assert _target_named(what, message), (what, message)
        assert not _debris(ws), (what, _debris(ws))
        assert_consistent(ws)
        after = tree(ws)
        final = what.split(" (")[0]
        if "<" not in final:  # a fixed file: as it was before the run
            assert after.get(final) == before.get(final), what
        if what == "registry/events.jsonl (promoted)":  # the last write: the new champion stands, whole
            assert "The champion is v0002 nonetheless" in message
            assert json.loads(champion_file.read_text()) == {"version": "v0002", "previous": ["v0001"]}
        else:
            assert champion_file.read_bytes() == old_champion, what
        for path in set(after) - set(before):  # what this run left: whole files only
            if path.endswith(".json") and after[path] != b"<dir>":
                json.loads(after[path])
    assert struck == writes

    registry = Registry.from_params(params)
    (record,) = [r for r in registry.list_versions() if r.task_id == "sentiment"]
    assert record.version == "v0002" and registry.champion().version == "v0002"
    assert decisions(registry, "v0002") == ["registered"]  # the "promoted" line was the one the disk refused
    assert run_library(params, tiny_base) == []  # nothing left: decided once
    assert not _debris(ws) and (ws / "registry" / "snapshots" / "sentiment" / "task.yaml").is_file()
    print(f"\n[disk full] {len(struck)} writes struck in turn: {', '.join(struck)}")


# --- each writer on its own ---------------------------------------------------------------------------------------
def test_an_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    from moecl.io import write_json_atomic

    path = write_json_atomic(tmp_path / "metrics" / "cl.json", {"acc": 0.5})
    disk = DiskFull(tmp_path, strike=lambda w: w == "metrics/cl.json")
    with disk.installed(), pytest.raises(WriteError) as caught:
        write_json_atomic(path, {"acc": 0.9, "pad": "x" * 10000}, what="the metrics")
    assert str(caught.value).startswith(f"could not write the metrics {path}: {ENOSPC}")
    assert f"Nothing was half-written: {path} is as it was." in str(caught.value)
    assert json.loads(path.read_text()) == {"acc": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["cl.json"]


def test_a_registry_append_on_a_full_disk_takes_its_partial_line_back(tmp_path):
    registry = Registry(tmp_path / "registry", tmp_path)
    first = registry.register(stub_bank(tmp_path, "a"))
    log_before = registry.events_path.read_bytes()
    disk = DiskFull(tmp_path, strike=lambda w: w == "registry/events.jsonl (registered)")
    with disk.installed(), pytest.raises(WriteError, match=rf"registry/events.jsonl: {ENOSPC}"):
        registry.register(stub_bank(tmp_path, "b"))
    assert registry.events_path.read_bytes() == log_before  # no half line
    assert [r.version for r in registry.list_versions()] == [first.version]  # and no record without its event
    assert registry.register(stub_bank(tmp_path, "c")).version == "v0002"  # the id was not burnt

    disk = DiskFull(tmp_path, strike=lambda w: w == "registry/versions/<record>")
    with (
        disk.installed(),
        pytest.raises(WriteError, match=rf"registry record of v0003 .*v0003.json: {ENOSPC}"),
    ):
        registry.register(stub_bank(tmp_path, "d"))
    assert (
        not list(registry.versions_dir.glob(".tmp-*")) and not (registry.versions_dir / "v0003.json").exists()
    )

    registry.promote("v0001")
    champion = registry.champion_path.read_bytes()
    disk = DiskFull(tmp_path, strike=lambda w: w == "registry/champion.json")
    with disk.installed(), pytest.raises(WriteError, match=rf"champion pointer .*champion.json: {ENOSPC}"):
        registry.promote("v0002")
    assert registry.champion_path.read_bytes() == champion
    assert registry.get("v0002").status == "candidate" and not list(registry.root.glob(".champion.json.*"))


def test_a_bank_write_on_a_full_disk_leaves_no_bank_and_no_temporary_folder(tmp_path, tiny_base):
    from moecl.bank import load_bank, save_bank
    from moecl.config import Params
    from moecl.testing import make_task
    from moecl.train.step import run_step

    params = Params()
    params.train.epochs, params.train.max_length, params.evaluate.fwt = 1, 48, False
    run_step(
        params,
        make_task("topics", ["sports", "business", "science"]),
        base=tiny_base,
        out_bank=tmp_path / "banks" / "b1",
        progress=False,
    )
    loaded = load_bank(tmp_path / "banks" / "b1", tiny_base)

    def write(out):
        args = {
            "trained_task": "topics",
            "parent_dir": None,
            "steps": ["topics"],
            "history": {},
            "lineage": {},
        }
        save_bank(loaded.model, out, base=tiny_base, **args)

    for what in ("banks/<new bank>/expert-topics.safetensors", "banks/<new bank>/bank.json"):
        out = tmp_path / "banks" / "b2"
        disk = DiskFull(tmp_path, strike=lambda w, what=what: w == what)
        with disk.installed(), pytest.raises(WriteError) as caught:
            write(out)
        message = str(caught.value)
        assert message.startswith(f"could not write the bank {out}: {ENOSPC}"), message
        assert what.split("/")[-1] in message and "the temporary folder" in message
        assert sorted(p.name for p in (tmp_path / "banks").iterdir()) == ["b1"]
    # the staging folder itself cannot be made (a file stands where the banks' folder should be)
    (tmp_path / "not-a-folder").write_text("x")
    out = tmp_path / "not-a-folder" / "b3"
    with pytest.raises(WriteError) as caught:
        write(out)
    message = str(caught.value)
    assert message.startswith(f"could not write the bank {out}"), message
    assert f"It failed making a folder in {out.parent}; nothing was kept." in message, message
    assert (tmp_path / "not-a-folder").read_text() == "x"
