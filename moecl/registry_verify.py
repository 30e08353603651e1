"""`moecl registry verify [--all]`: an fsck of the registry, one problem per line, each naming its file.

Checked:
- `champion.json` parses, names registered versions, and the champion's bank is whole: its manifest (schema
  and checksum) and every file's sha256;
- every record `versions/vNNNN.json` parses and is the version its name says; every registered bank exists
  and has a readable, whole manifest (with `--all`: every file of every bank is hashed, not just the
  champion's);
- every line of `events.jsonl` parses as an event, and no decision is without its bank: every version an
  event names has its record and its bank folder.

The champion's problems are the ones a self-evolution run cannot go on with (`Problem.champion`): the run's
first check (moecl.evolve.preflight) refuses to train from that champion; other problems are reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moecl.integrity import bank_problems
from moecl.registry import EVENTS, Registry, VersionRecord, is_version_id


@dataclass(frozen=True)
class Problem:
    message: str  # starts with the file it is about
    champion: bool = False  # about the champion (its pointer, record or bank)

    def __str__(self) -> str:
        return self.message


def verify_registry(registry: Registry, all_banks: bool = False) -> list[Problem]:
    """Every problem of the registry (empty when it is sound). Reads only; hashes the champion's bank
    (every bank's with `all_banks`)."""
    records, problems = _records(registry)
    champion, chain, pointer = _champion(registry, records)
    problems += pointer
    for version, record in sorted(records.items()):
        is_champion = version == champion
        hashed = all_banks or is_champion
        found = bank_problems(registry.bank_path(record), hashes=hashed)
        problems += [Problem(f"{line} ({version})", champion=is_champion) for line in found]
    problems += _events(registry, records)
    missing = [v for v in chain if not registry.versions_dir.joinpath(f"{v}.json").exists()]
    problems += [
        Problem(f"{registry.champion_path}: names {v}, which has no record", champion=v == champion)
        for v in missing
    ]
    return problems


def champion_problems(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.champion]


def _records(registry: Registry) -> tuple[dict[str, VersionRecord], list[Problem]]:
    records, problems = {}, []
    if not registry.versions_dir.is_dir():
        return records, problems
    for path in sorted(registry.versions_dir.glob("*.json")):
        if path.name.startswith("."):  # a temporary record of an interrupted write: never read
            continue
        if not is_version_id(path.stem):
            problems.append(Problem(f"{path}: not a version record name (expected vNNNN.json)"))
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(Problem(f"{path}: not valid JSON ({exc})"))
            continue
        if not isinstance(raw, dict) or raw.get("version") != path.stem:
            problems.append(Problem(f"{path}: does not hold the record of {path.stem}"))
            continue
        if not isinstance(raw.get("bank_dir"), str) or not raw["bank_dir"]:
            problems.append(Problem(f"{path}: bank_dir: expected the bank's folder"))
            continue
        records[path.stem] = VersionRecord.from_dict(raw)
    return records, problems


def _champion(registry: Registry, records: dict) -> tuple[str | None, list[str], list[Problem]]:
    """(champion version, every version champion.json names, problems of the pointer itself)."""
    path = registry.champion_path
    if not path.exists():
        return None, [], []
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [], [Problem(f"{path}: not valid JSON ({exc})", champion=True)]
    if not isinstance(state, dict):
        return None, [], [Problem(f"{path}: expected a JSON object", champion=True)]
    version, previous = state.get("version"), state.get("previous", [])
    problems = []
    if not is_version_id(version):
        problems.append(Problem(f"{path}: version: {version!r} is not a registry version", champion=True))
        version = None
    if not isinstance(previous, list) or not all(is_version_id(v) for v in previous):
        problems.append(Problem(f"{path}: previous: expected a list of registry versions"))
        previous = []
    chain = ([version] if version else []) + list(previous)
    return version, chain, problems


def _events(registry: Registry, records: dict[str, VersionRecord]) -> list[Problem]:
    path = registry.events_path
    if not path.exists():
        return []
    problems = []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        return [Problem(f"{path}: cannot read the decision log ({exc})")]
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            problems.append(Problem(f"{path}:{number}: not valid JSON (a torn line? every reader skips it)"))
            continue
        if not isinstance(event, dict) or event.get("event") not in EVENTS:
            problems.append(Problem(f"{path}:{number}: not an event (expected one of {', '.join(EVENTS)})"))
            continue
        if event["event"] == "failed":
            continue
        for key in ("version", "to"):
            version = event.get(key)
            if key == "to" and version is None:
                continue
            problems += _decision_without_bank(registry, records, f"{path}:{number}", event["event"], version)
    return problems


def _decision_without_bank(
    registry: Registry, records: dict[str, VersionRecord], where: str, kind: str, version
) -> list[Problem]:
    if not is_version_id(version):
        return [Problem(f"{where}: {kind}: {version!r} is not a registry version")]
    if version not in records:
        record_file = registry.versions_dir / f"{version}.json"
        if record_file.exists():
            return []  # its record is unreadable: reported above
        return [Problem(f"{where}: {kind} {version}, which has no record ({record_file} is missing)")]
    bank = registry.bank_path(records[version])
    if not bank.is_dir():
        return [Problem(f"{where}: {kind} {version}, whose bank {bank} is missing")]
    return []
