"""`moecl data pull`: the data version a DVC file names, brought into the workspace whole or not at all.

A plain `dvc pull` of a version that the remote lacks fails after it has started on the workspace: when the
remote lacks the version's listing (the `.dir` object of a version that was never pushed), DVC's checkout
removes the data folder and then reports "Checkout failed". Here every object of the version is fetched into
the cache first and counted; if any is missing, nothing in the workspace changes and the error names the
version (the DVC file's md5, which `moecl data publish` sends as `data_dvc_md5`), the files and the task
folders that are missing. Only a complete version is checked out, under the workspace's evolution lock, so
no run reads the data folder half-way through.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from moecl.config import Params
from moecl.errors import MoeclError


class MissingDataError(MoeclError):
    """The DVC remote lacks (part of) a data version; the workspace was not changed."""


@dataclass
class PulledVersion:
    md5: str  # the data version (outs[0].md5 of the DVC file)
    path: Path  # the folder it was checked out into
    files: int


def tracked_output(dvc_file: Path) -> tuple[str, str]:
    """(path, md5) of the DVC file's first output."""
    try:
        outs = (yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("outs") or []
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise MoeclError(f"{dvc_file}: cannot read the DVC file ({exc})") from None
    first = outs[0] if outs and isinstance(outs[0], dict) else {}
    if not first.get("md5") or not first.get("path"):
        raise MoeclError(f"{dvc_file}: outs[0] has no md5 and path: not a DVC file of `dvc add`")
    return str(first["path"]), str(first["md5"])


def _listing(repo, md5: str, remote: str | None) -> list[dict] | None:
    """The entries of a folder version ({md5, relpath} each): from the cache, else read from the remote (DVC
    keeps a listing out of the cache while files of it failed to download); None if neither has it."""
    path = Path(repo.cache.local.oid_to_path(md5))
    try:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        odb = repo.cloud.get_remote_odb(remote, "pull")
        return json.loads(odb.fs.cat_file(odb.oid_to_path(md5)))
    except (OSError, ValueError):
        return None


def missing_objects(repo, md5: str, remote: str | None = None) -> list[str]:
    """What of version `md5` the local cache lacks: the paths inside the output, or the version's listing."""
    cache = repo.cache.local
    if not md5.endswith(".dir"):
        return [] if Path(cache.oid_to_path(md5)).is_file() else [f"the file of the version ({md5})"]
    entries = _listing(repo, md5, remote)
    if entries is None:
        return [f"the listing of the version ({md5})"]
    missing = [e["relpath"] for e in entries if not Path(cache.oid_to_path(e["md5"])).is_file()]
    if not missing and not Path(cache.oid_to_path(md5)).is_file():
        return [f"the listing of the version ({md5})"]
    return missing


def _task_folders(relpaths: list[str], data_path: str, params: Params) -> list[str]:
    """The task folders (under data.root) that the missing paths belong to."""
    root = Path(params.data.root)
    folders = set()
    for rel in relpaths:
        full = Path(data_path) / rel
        try:
            folders.add(full.relative_to(root).parts[0])
        except (ValueError, IndexError):
            continue
    return sorted(folders)


def pull_data(params: Params, dvc_file: str | Path = "data.dvc", remote: str | None = None) -> PulledVersion:
    """Fetch the version `dvc_file` names from the DVC remote; check it out only if it came whole."""
    from dvc.exceptions import DownloadError, DvcException
    from dvc.repo import Repo

    from moecl.evolve import evolution_lock

    dvc_file = Path(dvc_file)
    data_path, md5 = tracked_output(dvc_file)
    try:
        repo = Repo(str(dvc_file.resolve().parent))
    except DvcException as exc:
        raise MoeclError(f"{dvc_file}: not in a DVC project ({exc})") from None
    with repo:
        try:
            repo.fetch(targets=[str(dvc_file)], remote=remote)
        except DownloadError:
            pass  # what did not come is listed below, by name
        except DvcException as exc:
            raise MoeclError(
                f"could not fetch data version {md5} ({dvc_file}) from the DVC remote: {exc}. "
                f"Nothing was changed: {data_path}/ is as it was."
            ) from None
        missing = missing_objects(repo, md5, remote)
        if missing:
            tasks = _task_folders(missing, data_path, params)
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise MissingDataError(
                f"the DVC remote{f' {remote!r}' if remote else ''} lacks data version {md5} ({dvc_file}): "
                f"{len(missing)} missing: {shown}"
                + (f" (task folders: {', '.join(tasks)})" if tasks else "")
                + f". Nothing was changed: {data_path}/ is as it was. Push that version from where it was "
                "added (`dvc push`), or check out a DVC file whose data the remote holds."
            )
        with evolution_lock(params):
            try:
                repo.checkout(targets=[str(dvc_file)])
            except DvcException as exc:
                raise MoeclError(f"checking out data version {md5} ({dvc_file}) failed: {exc}") from None
    files = sum(1 for p in Path(dvc_file.parent, data_path).rglob("*") if p.is_file())
    return PulledVersion(md5, dvc_file.parent / data_path, files)
