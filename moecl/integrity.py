"""Is a bank on disk the one that was written? Its manifest's schema and checksum, every file's sha256.

`bank.json` records the sha256 of every tensor file (tasks[*].sha256, shared.sha256), and since format
moecl-bank/2 a checksum of its own parsed content (`manifest_sha256`: the sha256 of the manifest without that
key, as canonical JSON). A flipped byte in a tensor file, a truncated or missing file, and a flipped byte in
bank.json itself (a value, a key, a hash) are all caught; a flip that leaves the JSON's meaning unchanged
(inside whitespace) is harmless. Manifests of format moecl-bank/1 were written before the checksum existed:
their tensor files are checked, their own bytes cannot be.

`parse_manifest` checks the JSON; `read_manifest` and `verify_bank` give it typed (moecl.manifest's
BankManifest), which is how the rest of the code reads a manifest.

No torch here: the registry, its verification and the CLI use it without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moecl.errors import BankError, IntegrityError
from moecl.manifest import BankManifest

FORMAT = "moecl-bank/2"
LEGACY_FORMATS = ("moecl-bank/1",)  # no manifest checksum
MANIFEST = "bank.json"
SHARED_FILE = "shared.safetensors"
EVALUATION = "evaluation.json"
CHECKSUM_KEY = "manifest_sha256"
_REQUIRED = {  # key: type, of a manifest's top level (what load_bank reads)
    "base_model": dict,
    "method": dict,
    "lora": dict,
    "tasks": list,
    "steps": list,
    "lineage": dict,
}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """The sha256 of the manifest's content without its checksum key, as canonical JSON."""
    content = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as written: the current format and its checksum."""
    content = {**manifest, "format": FORMAT}
    content.pop(CHECKSUM_KEY, None)
    return {**content, CHECKSUM_KEY: manifest_checksum(content)}


def parse_manifest(bank_dir: str | Path) -> dict[str, Any]:
    """bank.json of `bank_dir` as JSON, parsed and checked (schema and checksum). A missing manifest is a
    BankError (not a bank); one that does not parse or fails its checks is an IntegrityError naming the file.
    Code that uses a manifest reads it typed, with `read_manifest`."""
    path = Path(bank_dir) / MANIFEST
    if not path.is_file():
        raise BankError(f"{path}: no bank manifest here (is {bank_dir} an expert bank?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc}); the manifest is corrupted") from None
    problems = manifest_problems(path, manifest)
    if problems:
        raise IntegrityError("\n".join(problems))
    return manifest


def read_manifest(bank_dir: str | Path) -> BankManifest:
    """bank.json of `bank_dir`, checked as `parse_manifest` does, as a BankManifest."""
    return BankManifest.from_json(parse_manifest(bank_dir), Path(bank_dir) / MANIFEST)


def manifest_problems(path: Path, manifest: Any) -> list[str]:
    """What is wrong with a parsed manifest (one line each, naming `path`); empty if nothing."""
    if not isinstance(manifest, dict):
        return [f"{path}: expected a JSON object, found {type(manifest).__name__}"]
    fmt = manifest.get("format")
    if fmt != FORMAT and fmt not in LEGACY_FORMATS:
        return [f"{path}: format {fmt!r} is not {FORMAT!r}"]
    if fmt == FORMAT:
        expected, found = manifest.get(CHECKSUM_KEY), manifest_checksum(manifest)
        if expected != found:
            return [
                f"{path}: manifest checksum mismatch: expected sha256 {expected}, found {found} "
                "(bank.json was changed after it was written)"
            ]
    elif CHECKSUM_KEY in manifest:  # a flipped format byte must not turn a sealed manifest into a legacy one
        return [f"{path}: format {fmt!r} has no {CHECKSUM_KEY!r}; this manifest was altered"]
    problems = [
        f"{path}: {key}: expected {kind.__name__}, found {type(manifest.get(key)).__name__}"
        for key, kind in _REQUIRED.items()
        if not isinstance(manifest.get(key), kind)
    ]
    if problems:
        return problems
    for i, entry in enumerate(manifest["tasks"]):
        problems += _entry_problems(path, f"tasks[{i}]", entry, ("task_id", "labels", "file", "sha256"))
    if manifest.get("shared") is not None:
        problems += _entry_problems(path, "shared", manifest["shared"], ("file", "sha256"))
    base = manifest["base_model"]
    if not isinstance(base.get("name"), str) or not isinstance(base.get("sha256"), str):
        problems.append(f"{path}: base_model: expected name and sha256 strings")
    return problems


def _entry_problems(path: Path, where: str, entry: Any, keys: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{path}: {where}: expected an object"]
    missing = [k for k in keys if k not in entry]
    if missing:
        return [f"{path}: {where}: missing {', '.join(missing)}"]
    name = entry["file"]
    if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
        return [f"{path}: {where}.file: {name!r} is not a file name inside the bank"]
    if not name.endswith(".safetensors"):
        return [f"{path}: {where}.file: {name!r} is not a .safetensors file (banks hold safetensors only)"]
    return []


def bank_files(manifest: BankManifest) -> list[tuple[str, str]]:
    """(file name, recorded sha256) of every tensor file the manifest lists."""
    files = [(t.file, t.sha256) for t in manifest.tasks]
    if manifest.shared:
        files.append((manifest.shared.file, manifest.shared.sha256))
    return files


def file_problems(bank_dir: str | Path, manifest: BankManifest) -> list[str]:
    """Each listed file that is missing or whose sha256 is not the recorded one (one line each)."""
    problems = []
    for name, expected in bank_files(manifest):
        path = Path(bank_dir) / name
        if not path.is_file():
            problems.append(f"{path}: missing (bank.json records sha256 {expected})")
            continue
        found = file_sha256(path)
        if found != expected:
            problems.append(
                f"{path}: sha256 mismatch: expected {expected}, found {found} "
                f"({path.stat().st_size} bytes; the file is corrupted or truncated)"
            )
    return problems


def bank_problems(bank_dir: str | Path, hashes: bool = True) -> list[str]:
    """Everything wrong with a bank folder: its manifest, its files (their hashes unless `hashes` is False:
    then only that they exist), its evaluation.json (parses). Empty for a whole bank."""
    bank_dir = Path(bank_dir)
    if not bank_dir.is_dir():
        return [f"{bank_dir}: the bank folder is missing"]
    try:
        manifest = read_manifest(bank_dir)
    except BankError as exc:
        return str(exc).splitlines()
    if hashes:
        problems = file_problems(bank_dir, manifest)
    else:
        problems = [
            f"{bank_dir / name}: missing"
            for name, _ in bank_files(manifest)
            if not (bank_dir / name).is_file()
        ]
    evaluation = bank_dir / EVALUATION
    if evaluation.exists():
        try:
            if not isinstance(json.loads(evaluation.read_text(encoding="utf-8")), dict):
                problems.append(f"{evaluation}: expected a JSON object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{evaluation}: not valid JSON ({exc})")
    return problems


def verify_bank(bank_dir: str | Path) -> BankManifest:
    """Raise IntegrityError listing every file of the bank that is not as written; return its manifest."""
    manifest = read_manifest(bank_dir)
    problems = file_problems(bank_dir, manifest)
    if problems:
        raise IntegrityError(f"the bank {bank_dir} is corrupted:\n  " + "\n  ".join(problems))
    return manifest
