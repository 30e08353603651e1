"""`moecl data pull`: a DVC remote that lacks (part of) a data version gives an error naming the version, the files
and the task folders missing, and changes nothing in the workspace; a whole version is checked out.

Real DVC projects (no git: `dvc init --no-scm`), a local folder as the remote. A producer adds and pushes data
versions; a consumer workspace gets the DVC file (as `git pull` would bring it) and pulls.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from moecl.cli import main
from moecl.data.remote import MissingDataError, pull_data
from moecl.testing import make_task, write_task_folder


def _dvc_project(folder: Path, remote: Path):
    from dvc.repo import Repo

    folder.mkdir(parents=True)
    Repo.init(str(folder), no_scm=True).close()
    repo = Repo(str(folder))
    with repo.config.edit() as conf:
        conf["remote"]["storage"] = {"url": str(remote)}
        conf["core"]["remote"] = "storage"
        conf["core"]["analytics"] = False
    return repo


def _add(repo, producer: Path, push: bool) -> str:
    cwd = os.getcwd()
    os.chdir(producer)
    try:
        repo.add(["data"])
        if push:
            repo.push()
    finally:
        os.chdir(cwd)
    return (producer / "data.dvc").read_text()


def _files(root: Path) -> dict[str, bytes]:
    """The workspace as a run sees it: everything but DVC's own folder (its cache may gain fetched objects)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".dvc" not in p.relative_to(root).parts
    }


@pytest.fixture
def projects(tmp_path):
    """(producer, its repo, consumer, remote, the two DVC files): v1 = topics, v2 = topics + sentiment."""
    remote = tmp_path / "remote"
    producer, consumer = tmp_path / "producer", tmp_path / "consumer"
    repo = _dvc_project(producer, remote)
    _dvc_project(consumer, remote).close()
    (consumer / "params.yaml").write_text(yaml.safe_dump({"data": {"root": "data/tasks"}}))
    write_task_folder(producer / "data" / "tasks", make_task("topics", ["sports", "business", "science"]))
    v1 = _add(repo, producer, push=True)
    write_task_folder(producer / "data" / "tasks", make_task("sentiment", ["positive", "negative"]))
    v2 = _add(repo, producer, push=False)
    return producer, repo, consumer, remote, v1, v2


def _md5(dvc_text: str) -> str:
    return yaml.safe_load(dvc_text)["outs"][0]["md5"]


def _restore_remote(repo, remote: Path, dvc_text: str) -> None:
    listing = json.loads(Path(repo.cache.local.oid_to_path(_md5(dvc_text))).read_text())
    for entry in listing:
        target = remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
        if not target.exists():
            shutil.copyfile(repo.cache.local.oid_to_path(entry["md5"]), target)


def _lose_from_remote(repo, remote: Path, dvc_text: str, task_id: str) -> list[str]:
    """Delete the remote's copies of one task folder's files of a version; returns their paths in the data."""
    listing = json.loads(Path(repo.cache.local.oid_to_path(_md5(dvc_text))).read_text())
    lost = []
    for entry in listing:
        if entry["relpath"].startswith(f"tasks/{task_id}/"):
            (remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]).unlink()
            lost.append(entry["relpath"])
    return lost


@pytest.mark.parametrize("gap", ["never-pushed", "files-missing"])
def test_a_version_the_remote_lacks_is_named_and_nothing_changes(
    projects, gap, monkeypatch, capsys, tmp_path
):
    producer, repo, consumer, remote, v1, v2 = projects
    monkeypatch.chdir(consumer)
    (consumer / "data.dvc").write_text(v1)
    assert main(["data", "pull"]) == 0  # v1 comes whole
    assert f"data version {_md5(v1)}" in capsys.readouterr().out
    assert (consumer / "data" / "tasks" / "topics" / "task.yaml").is_file()

    if gap == "files-missing":
        cwd = os.getcwd()
        os.chdir(producer)
        repo.push()
        os.chdir(cwd)
        lost = _lose_from_remote(repo, remote, v2, "sentiment")
        assert lost
    (consumer / "data.dvc").write_text(v2)  # what `git pull` brings: the DVC file of the new version
    before = _files(consumer)
    with pytest.raises(MissingDataError) as caught:
        pull_data(_params(consumer))
    message = str(caught.value)
    assert f"lacks data version {_md5(v2)} (data.dvc)" in message
    assert "Nothing was changed: data/ is as it was" in message
    if gap == "files-missing":
        assert all(path in message for path in lost) and "(task folders: sentiment)" in message, (
            lost,
            message,
        )
    else:
        assert f"the listing of the version ({_md5(v2)})" in message
    assert _files(consumer) == before
    if gap == "never-pushed":  # what `moecl data pull` spares the workspace (README, docs/operations.md)
        _plain_dvc_pull_removes_the_data(consumer, tmp_path)
    assert main(["data", "pull"]) == 2 and f"lacks data version {_md5(v2)}" in capsys.readouterr().err
    assert _files(consumer) == before

    # the version reaches the remote whole (pushed; lost objects put back, which `dvc push` would not redo: it
    # remembers what it uploaded): now it comes in
    cwd = os.getcwd()
    os.chdir(producer)
    repo.push()
    os.chdir(cwd)
    _restore_remote(repo, remote, v2)
    pulled = pull_data(_params(consumer))
    assert pulled.md5 == _md5(v2)
    assert sorted(p.name for p in (consumer / "data" / "tasks").iterdir()) == ["sentiment", "topics"]


def _plain_dvc_pull_removes_the_data(consumer: Path, tmp_path: Path) -> None:
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    copy = tmp_path / "plain-pull"
    shutil.copytree(consumer, copy)
    with Repo(str(copy)) as repo, pytest.raises(CheckoutError):
        repo.pull(targets=[str(copy / "data.dvc")])
    assert not (copy / "data").exists()


def _params(consumer: Path):
    from moecl.config import load_params

    return load_params(str(consumer / "params.yaml"))
