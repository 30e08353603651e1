"""Seeded, stratified sampling and splitting of task records (deterministic for a given seed).

Two samplers, kept apart because stored data and runs depend on each one's exact draw: `stratified_sample` (a cap
on the total, used when training and evaluating) and `sample_per_class` (per-label and total caps with a salted
seed, used by the importers and the benchmark's data)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from moecl.data.task import Record


def by_label(records: list[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        groups[r.label].append(r)
    return groups


def stratified_sample(records: list[Record], n: int, seed: int) -> list[Record]:
    """At most n records, label shares kept (round-robin over labels), order shuffled by the seed."""
    if n <= 0 or n >= len(records):
        return list(records)
    rng = random.Random(seed)
    groups = {label: rng.sample(recs, len(recs)) for label, recs in sorted(by_label(records).items())}
    picked: list[Record] = []
    while len(picked) < n:
        for label in list(groups):
            if groups[label] and len(picked) < n:
                picked.append(groups[label].pop())
    rng.shuffle(picked)
    return picked


def split_dev(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Carve a stratified dev split (at least one record per label with >= 2 records) from train."""
    if fraction <= 0:
        return list(records), []
    rng = random.Random(seed)
    train, dev = [], []
    for _, recs in sorted(by_label(records).items()):
        recs = rng.sample(recs, len(recs))
        k = int(round(len(recs) * fraction))
        k = min(max(k, 1), len(recs) - 1) if len(recs) >= 2 else 0
        dev.extend(recs[:k])
        train.extend(recs[k:])
    rng.shuffle(train)
    return train, dev


def _allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` across classes in proportion to their sizes (largest remainder; never above a class size)."""
    available = sum(sizes.values())
    if total <= 0 or total >= available:
        return dict(sizes)
    exact = {k: total * n / available for k, n in sizes.items()}
    take = {k: int(v) for k, v in exact.items()}
    for k in sorted(sizes, key=lambda k: (-(exact[k] - take[k]), list(sizes).index(k)))[
        : total - sum(take.values())
    ]:
        take[k] += 1
    return take


def sample_per_class(
    rows: Sequence[Record], labels: Sequence[str], per_class: int, total: int, seed: int, salt: str = ""
) -> list[Record]:
    """A seeded, stratified sample: at most `per_class` rows of each label, then at most `total` rows overall."""
    groups: dict[str, list[Record]] = {label: [] for label in labels}
    for r in rows:
        groups[r.label].append(r)
    for label in labels:
        random.Random(f"{seed}:{salt}:{label}").shuffle(groups[label])
        if per_class > 0:
            groups[label] = groups[label][:per_class]
    take = _allocate({k: len(v) for k, v in groups.items()}, total)
    out = [r for label in labels for r in groups[label][: take[label]]]
    random.Random(f"{seed}:{salt}:order").shuffle(out)
    return out


def split_off_test(
    rows: list[Record], labels: Sequence[str], fraction: float, seed: int
) -> tuple[list, list]:
    """Stratified train/test split of one source (each label keeps at least one row in train)."""
    train, test = [], []
    for label in labels:
        group = [r for r in rows if r.label == label]
        random.Random(f"{seed}:split:{label}").shuffle(group)
        n_test = min(int(round(len(group) * fraction)), max(0, len(group) - 1))
        test += group[:n_test]
        train += group[n_test:]
    return train, test
