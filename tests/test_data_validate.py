"""Task-folder validation: one broken folder per defect kind, each issue pinned to its file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moecl.config import DataConfig
from moecl.data.validate import (
    DataValidationError,
    Issue,
    list_task_folders,
    load_task,
    task_folder_hash,
    task_id_issues,
    validate_task_folder,
)

GOOD_YAML = (
    "labels: [pos, neg]\ninstruction: Is the review positive or negative?\ndescription: toy sentiment\n"
)


def _line(text: str, label: str, **extra) -> str:
    return json.dumps({"text": text, "label": label, **extra})


def _train_lines() -> list[str]:
    return [_line(f"good film number {i}", "pos") for i in range(3)] + [
        _line(f"bad film number {i}", "neg") for i in range(3)
    ]


def _test_lines() -> list[str]:
    return [_line("a lovely day out", "pos"), _line("a dreadful day out", "neg")]


def make_task(
    root: Path,
    name: str = "toy",
    *,
    yaml_text: str | None = GOOD_YAML,
    train: list[str] | bytes | None = None,
    test: list[str] | bytes | None = None,
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if yaml_text is not None:
        (folder / "task.yaml").write_text(yaml_text, encoding="utf-8")
    for fname, content, default in (
        ("train.jsonl", train, _train_lines()),
        ("test.jsonl", test, _test_lines()),
    ):
        content = default if content is None else content
        data = (
            content
            if isinstance(content, bytes)
            else ("\n".join(content) + "\n").encode()
            if content
            else b""
        )
        (folder / fname).write_bytes(data)
    return folder


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>", p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def check(folder: Path, cfg: DataConfig | None = None) -> list[Issue]:
    before = snapshot(folder.parent)
    issues = validate_task_folder(folder, cfg or DataConfig())
    assert snapshot(folder.parent) == before, "validation wrote something"
    return issues


def only(issues: list[Issue]) -> Issue:
    assert len(issues) == 1, "\n".join(map(str, issues))
    return issues[0]


def test_valid_folder_has_no_issues(tmp_path):
    assert check(make_task(tmp_path)) == []


def test_crlf_bom_and_trailing_blank_lines_are_accepted(tmp_path):
    train = ("\ufeff" + "\r\n".join(_train_lines()) + "\r\n\r\n\n  \n").encode("utf-8")
    folder = make_task(tmp_path, train=train, yaml_text="\ufeff" + GOOD_YAML.replace("\n", "\r\n"))
    assert check(folder) == []
    task = load_task(folder)
    assert [r.text for r in task.train][0] == "good film number 0"
    assert len(task.train) == 6 and len(task.test) == 2
    assert task.labels == ["pos", "neg"] and task.task_id == "toy" and task.dev is None


def test_non_utf8_line(tmp_path):
    lines = [ln.encode() for ln in _train_lines()]
    lines[2] = b'{"text": "caf\xe9 au lait", "label": "pos"}'
    folder = make_task(tmp_path, train=b"\n".join(lines) + b"\n")
    issue = only(check(folder))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 3, None)
    assert "UTF-8" in issue.message and "0xe9" in issue.message


def test_malformed_json(tmp_path):
    lines = _train_lines()
    lines[1] = '{"text": "oops", "label": "pos"'
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 2, None)
    assert "not valid JSON" in issue.message


def test_not_an_object(tmp_path):
    lines = _train_lines() + ['["a list", "pos"]']
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 7, None)


def test_missing_field(tmp_path):
    lines = _train_lines()
    lines[3] = json.dumps({"text": "no label here"})
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field, issue.message) == (
        str(folder / "train.jsonl"),
        4,
        "label",
        "missing",
    )


def test_non_string_field(tmp_path):
    test = [_line("fine", "pos"), json.dumps({"text": 42, "label": "neg"})]
    issue = only(check(folder := make_task(tmp_path, test=test)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "test.jsonl"), 2, "text")
    assert "string" in issue.message


def test_bad_and_duplicate_ids(tmp_path):
    lines = _train_lines()
    lines[0] = _line("good film number 0", "pos", id=True)
    lines[1] = _line("good film number 1", "pos", id=7)
    lines[2] = _line("good film number 2", "pos", id="7")
    issues = check(folder := make_task(tmp_path, train=lines), DataConfig(min_examples_per_label=1))
    f = str(folder / "train.jsonl")
    assert [(i.file, i.line, i.field) for i in issues] == [(f, 1, "id"), (f, 3, "id")]
    assert "duplicate" in issues[1].message and "line 2" in issues[1].message


def test_unknown_record_field(tmp_path):
    lines = _train_lines()
    lines[5] = _line("bad film number 5", "neg", score=1)
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 6, "score")


def test_empty_text(tmp_path):
    lines = _train_lines() + [_line("   ", "neg")]
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field, issue.message) == (
        str(folder / "train.jsonl"),
        7,
        "text",
        "empty text",
    )


def test_blank_line_inside_file(tmp_path):
    lines = _train_lines()
    lines.insert(2, "")
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 3, None)


def test_unknown_label(tmp_path):
    test = [_line("a lovely day out", "pos"), _line("meh", "foo")]
    issue = only(check(folder := make_task(tmp_path, test=test)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "test.jsonl"), 2, "label")
    assert (
        str(issue) == f"{folder / 'test.jsonl'}:2: label: 'foo' is not a declared label (declared: pos, neg)"
    )


def test_declared_label_missing_in_train(tmp_path):
    yaml_text = "labels: [pos, neg, mixed]\ninstruction: Sentiment?\n"
    issue = only(check(folder := make_task(tmp_path, yaml_text=yaml_text)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), None, "label")
    assert "'mixed' has 0 training example" in issue.message


def test_too_few_examples_of_a_label(tmp_path):
    lines = _train_lines()[:4]  # 3 pos, 1 neg
    issue = only(check(folder := make_task(tmp_path, train=lines)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), None, "label")
    assert "'neg' has 1 training example" in issue.message
    assert check(folder, DataConfig(min_examples_per_label=1)) == []


def test_single_label_train(tmp_path):
    lines = [_line(f"good film number {i}", "pos") for i in range(4)]
    issues = check(folder := make_task(tmp_path, train=lines))
    f = str(folder / "train.jsonl")
    assert [(i.file, i.line, i.field) for i in issues] == [(f, None, "label"), (f, None, "label")]
    assert "'neg' has 0" in issues[0].message and "only 1 distinct label" in issues[1].message


def test_leakage_between_train_and_test(tmp_path):
    test = [_line("a lovely day out", "pos"), _line("  BAD film   Number 2 ", "neg")]
    issue = only(check(folder := make_task(tmp_path, test=test)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "test.jsonl"), 2, "text")
    assert "train.jsonl line 6" in issue.message and "leakage" in issue.message


def test_leakage_between_dev_and_test(tmp_path):
    folder = make_task(tmp_path)
    (folder / "dev.jsonl").write_text(
        _line("unrelated", "pos") + "\n" + _line("a dreadful day out", "neg") + "\n"
    )
    issue = only(check(folder))
    assert (issue.file, issue.line, issue.field) == (str(folder / "test.jsonl"), 2, "text")
    assert "dev.jsonl line 2" in issue.message


def test_huge_record(tmp_path):
    lines = _train_lines() + [_line("x" * 51, "pos")]
    folder = make_task(tmp_path, train=lines)
    issue = only(check(folder, DataConfig(max_text_chars=50)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 7, "text")
    assert "max_text_chars=50" in issue.message


def test_too_many_records(tmp_path):
    folder = make_task(tmp_path)
    issue = only(check(folder, DataConfig(max_records=5)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "train.jsonl"), 6, None)
    assert "max_records=5" in issue.message


def test_empty_file(tmp_path):
    issue = only(check(folder := make_task(tmp_path, test=b"\n\n")))
    assert (issue.file, issue.line, issue.field) == (str(folder / "test.jsonl"), None, None)
    assert "empty file" in issue.message


def test_missing_split(tmp_path):
    folder = make_task(tmp_path)
    (folder / "test.jsonl").unlink()
    issue = only(check(folder))
    assert (issue.file, issue.line, issue.field) == (str(folder / "test.jsonl"), None, None)


def test_missing_task_yaml(tmp_path):
    issue = only(check(folder := make_task(tmp_path, yaml_text=None)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "task.yaml"), None, None)
    assert "missing" in issue.message


@pytest.mark.parametrize(
    ("yaml_text", "line", "field", "words"),
    [
        ("labels: [pos, neg\ninstruction: x\n", 2, None, "not valid YAML"),
        ("- pos\n- neg\n", None, None, "mapping"),
        ("labels: pos\ninstruction: x\n", 1, "labels", "non-empty list"),
        ("labels: []\ninstruction: x\n", 1, "labels", "non-empty list"),
        ("labels: [pos, neg, pos]\ninstruction: x\n", 1, "labels", "twice"),
        ("labels: [pos, 3]\ninstruction: x\n", 1, "labels", "not a label"),
        ("instruction: x\nlabels: [pos]\n", 2, "labels", "at least two"),
        ("labels: [pos, neg]\n", None, "instruction", "missing"),
        ("labels: [pos, neg]\ninstruction: ''\n", 2, "instruction", "non-empty string"),
        ("labels: [pos, neg]\ninstruction: x\ndescription: [1]\n", 3, "description", "string"),
        ("labels: [pos, neg]\ninstruction: x\nlables: [a]\n", 3, "lables", "unknown key"),
        ("labels: [pos, neg]\ninstruction: x\npositive_label: yes\n", 3, "positive_label", "not one of"),
    ],
)
def test_bad_task_yaml(tmp_path, yaml_text, line, field, words):
    issue = only(check(folder := make_task(tmp_path, yaml_text=yaml_text)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "task.yaml"), line, field)
    assert words in issue.message


def test_positive_label_needs_a_binary_task(tmp_path):
    yaml_text = "labels: [pos, neg, mixed]\ninstruction: x\npositive_label: pos\n"
    lines = _train_lines() + [_line("so-so film", "mixed"), _line("fine-ish film", "mixed")]
    issue = only(check(folder := make_task(tmp_path, yaml_text=yaml_text, train=lines)))
    assert (issue.file, issue.line, issue.field) == (str(folder / "task.yaml"), 3, "positive_label")
    assert (
        load_task(make_task(tmp_path, "ok", yaml_text=GOOD_YAML + "positive_label: neg\n")).positive_label
        == "neg"
    )


@pytest.mark.parametrize(
    "bad", ["../x", "a/b", "UPPER", "", "-x", "_x", "a b", "x" * 65, "caf\u00e9", None, 3]
)
def test_bad_task_ids(bad):
    issue = only(task_id_issues(bad, "here"))
    assert (issue.file, issue.line, issue.field) == ("here", None, "task_id")


@pytest.mark.parametrize("good", ["a", "0", "agnews", "bbc-news", "spam_v2", "x" * 64])
def test_good_task_ids(good):
    assert task_id_issues(good, "here") == []


def test_bad_folder_name_is_reported(tmp_path):
    issue = only(check(folder := make_task(tmp_path, "UPPER")))
    assert (issue.file, issue.line, issue.field) == (str(folder), None, "task_id")


def test_every_issue_is_reported_at_once(tmp_path):
    lines = _train_lines() + ["{broken", _line("", "pos")]
    issues = check(make_task(tmp_path, "Bad Name", train=lines, test=[_line("x", "nope")]))
    assert [i.field for i in issues] == ["task_id", None, "text", "label"]


def test_load_task_raises_with_issues(tmp_path):
    folder = make_task(tmp_path, test=[_line("meh", "foo")])
    with pytest.raises(DataValidationError) as err:
        load_task(folder)
    assert [i.line for i in err.value.issues] == [1]
    assert f"{folder / 'test.jsonl'}:1: label:" in str(err.value)


def test_load_task_with_dev_and_ids(tmp_path):
    folder = make_task(tmp_path)
    (folder / "dev.jsonl").write_text(
        _line("an ok film", "pos", id=5) + "\n" + _line("a poor film", "neg", id="b") + "\n"
    )
    task = load_task(folder)
    assert [r.id for r in task.dev] == ["5", "b"]
    assert task.instruction == "Is the review positive or negative?" and task.description == "toy sentiment"
    assert task.path == folder


def test_task_folder_hash_is_deterministic_and_content_sensitive(tmp_path):
    a = make_task(tmp_path / "one", "toy")
    b = make_task(tmp_path / "two", "toy")
    assert task_folder_hash(a) == task_folder_hash(b)
    assert len(task_folder_hash(a)) == 64
    (b / "test.jsonl").write_text(_line("a lovely day out", "pos") + "\n")
    assert task_folder_hash(a) != task_folder_hash(b)
    (a / "test.jsonl").rename(a / "test2.jsonl")
    (a / "test2.jsonl").write_bytes((b / "test.jsonl").read_bytes())
    assert task_folder_hash(a) != task_folder_hash(b)  # names count, not only bytes


def test_list_task_folders(tmp_path):
    make_task(tmp_path, "b")
    make_task(tmp_path, "a")
    (tmp_path / ".a.tmp-123").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_task_folders(tmp_path)] == ["a", "b"]
    assert list_task_folders(tmp_path / "absent") == []
