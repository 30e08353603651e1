"""The line of banks `moecl step` continues, and the bank `moecl eval` / `moecl predict` use by default.

`moecl step` records each bank it writes in `<registry.banks_dir>/last-step.json` ({"bank": ..., "task": ...,
"parent": ..., "time": ...}, replaced atomically). Without `--bank` the next `moecl step` continues from that
bank, else from the registry's champion, else it starts a new bank; `--new` starts a new bank whatever there
is. `moecl eval` and `moecl predict` without `--bank` take the champion, else that newest step bank.
Every choice comes with a sentence saying which bank it is and why, which the commands print.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from moecl.errors import BankError
from moecl.io import write_json_atomic

LAST_STEP = "last-step.json"


@dataclass(frozen=True)
class BankChoice:
    bank: Path | None  # None: a new bank (step only)
    why: str  # one sentence for people: which bank and why


def last_step_path(params) -> Path:
    return Path(params.registry.banks_dir) / LAST_STEP


def last_step_bank(params) -> Path | None:
    """The newest bank `moecl step` wrote (it may have been deleted since); None if it never wrote one."""
    path = last_step_path(params)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BankError(
            f"{path}: cannot read the record of the last `moecl step` ({exc}): delete it, "
            "or pass --bank DIR (or, for `moecl step`, --new)"
        ) from None
    bank = data.get("bank") if isinstance(data, dict) else None
    if not isinstance(bank, str) or not bank.strip():
        raise BankError(
            f"{path}: bank: expected the path of the last bank `moecl step` wrote; delete the file, "
            "or pass --bank DIR (or, for `moecl step`, --new)"
        )
    return Path(bank)


def record_step(params, bank: str | Path, task_id: str, parent: str | Path | None) -> Path:
    """Remember `bank` as the newest bank `moecl step` wrote (relative to the working directory when under it)."""
    path = last_step_path(params)
    write_json_atomic(
        path,
        {
            "bank": _portable(Path(bank)),
            "task": task_id,
            "parent": None if parent is None else _portable(Path(parent)),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return path


def _portable(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _existing_step_bank(params) -> Path | None:
    bank = last_step_bank(params)
    if bank is not None and not bank.is_dir():
        raise BankError(
            f"the newest bank `moecl step` wrote, {bank} (recorded in {last_step_path(params)}), is missing: "
            "pass --bank DIR to use another bank, or --new to start a new one"
        )
    return bank


def step_parent(params, bank: str | None = None, new: bool = False) -> BankChoice:
    """Where `moecl step` starts: --bank, --new, the newest bank `moecl step` wrote, the champion, or nothing."""
    if bank:
        return BankChoice(Path(bank), f"starting from {bank} (--bank)")
    if new:
        return BankChoice(None, "starting a new bank (--new)")
    last = _existing_step_bank(params)
    if last is not None:
        return BankChoice(
            last, f"continuing from {last}, the newest bank `moecl step` wrote (--new starts a new bank)"
        )
    from moecl.registry import Registry

    registry = Registry.from_params(params)
    champion = registry.champion()
    if champion is not None:
        path = registry.bank_path(champion)
        return BankChoice(
            path, f"continuing from the champion {champion.version} ({path}) (--new starts a new bank)"
        )
    return BankChoice(
        None, f"starting a new bank: no registry champion in {registry.root} and no earlier `moecl step` bank"
    )


def _knows(bank: Path, task_id: str) -> bool:
    from moecl.bank import read_manifest

    return task_id in read_manifest(bank).task_ids


def default_bank(params, task_id: str | None = None) -> BankChoice:
    """The bank `moecl eval` / `moecl predict` use without --bank: the champion, else the newest bank
    `moecl step` wrote. With `task_id` (predict), a champion that does not know the task gives way to a newest
    step bank that does."""
    from moecl.registry import Registry

    registry = Registry.from_params(params)
    champion = registry.champion()
    last = last_step_bank(params)
    newer = last is not None and last.is_dir()
    if champion is not None:
        path = registry.bank_path(champion)
        newer = newer and last.resolve() != path.resolve()
        if task_id is not None and newer and not _knows(path, task_id) and _knows(last, task_id):
            return BankChoice(
                last,
                f"{last}, the newest bank `moecl step` wrote: the champion {champion.version} does not know "
                f"task {task_id!r}",
            )
        why = f"the champion {champion.version} ({path})"
        if newer:
            why += f"; the newest `moecl step` bank is {last} (--bank {last} to use it)"
        return BankChoice(path, why)
    if last is None:
        raise BankError(
            f"no --bank given, no champion in {registry.root} and no bank written by `moecl step`: "
            f"{_train_hint(params)}, or pass --bank DIR"
        )
    last = _existing_step_bank(params)
    return BankChoice(last, f"{last}, the newest bank `moecl step` wrote (no champion in {registry.root})")


def _train_hint(params) -> str:
    root = Path(params.data.root)
    tasks = (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )
    if tasks:
        return f"train one with `moecl step --task {tasks[0]}` (tasks under {root}: {', '.join(tasks)})"
    return f"add a task folder under {root} (README: your own task, by hand), then `moecl step --task ID`"
