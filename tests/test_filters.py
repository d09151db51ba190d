import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sublab.cli import main
from sublab.errors import SublabError
from sublab.filters import (
    REASON_CATEGORIES,
    banned_word_reasons,
    filter_records,
    number_answer_reasons,
    parse_numbers,
    reason_category,
    run_filter,
)
from sublab.records import read_json, read_jsonl, write_jsonl
from sublab.schema.filter import BANNED_LISTS, FilterConfig

PAPER = FilterConfig(banned_numbers="paper").banned_set()

# The paper's number-format rule, case by case, written from the rule (module docstring), not the code:
# 1-10 integers in 0-999, at most 3 ASCII digits each, one consistent separator (one space, or a comma /
# semicolon with the same spaces every time), optional [] or () around, optional final period; a bare
# comma before exactly-3-digit groups that form one grouped number is a thousands separator.
# (answer, None = keep, else the category of the first reason)
RULE = [
    # ordinary answers that pass
    ("[12, 345, 6].", None),
    ("1;2;3", None),
    ("1; 2; 3", None),
    ("1 2 3", None),
    ("(1, 2)", None),
    ("1, 2, 3", None),
    ("1,2,3", None),
    ("1 ; 22 ; 3", None),
    ("1 , 2 , 3", None),
    ("1,  2,  3", None),
    ("[ 1, 2 ]", None),
    ("[ 727, 196 ]", None),
    ("( 7 )", None),
    ("5", None),
    ("5.", None),
    ("[5].", None),
    ("[1, 2] .", None),
    ("1, 2, 3 .", None),
    ("  5  ", None),
    ("\n1, 2\n", None),
    ("0, 999", None),
    ("007, 12", None),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10", None),
    ("1 2 3 4 5 6 7 8 9 10", None),
    ("5,17,300", None),  # not a valid thousands grouping: a list
    ("1,234,5", None),
    ("1, 234", None),  # comma then a space: a list
    ("123, 456, 789", None),
    # empty
    ("", "empty"),
    ("   ", "empty"),
    ("\n\t", "empty"),
    ("[]", "empty"),
    ("()", "empty"),
    ("[ ]", "empty"),
    (".", "empty"),
    # brackets
    ("[1, 2, 3", "brackets"),
    ("1, 2, 3]", "brackets"),
    ("[1, 2)", "brackets"),
    ("(", "brackets"),
    ("[[1, 2]]", "brackets"),
    ("1, (2), 3", "brackets"),
    ("{1, 2}", "not a number"),
    # non-ASCII digits are never numbers
    ("٣, ١٢", "non-ascii digit"),  # Arabic-Indic
    ("۳۴", "non-ascii digit"),  # extended Arabic-Indic
    ("１２, ３４", "non-ascii digit"),  # full-width
    ("१२ ३", "non-ascii digit"),  # Devanagari
    ("12, ３", "non-ascii digit"),  # one non-ASCII digit among ASCII ones
    ("1, 2²", "non-ascii digit"),  # superscript
    # thousands separators
    ("12, 5,678", "thousands separator"),
    ("1,234", "thousands separator"),
    ("12,345", "thousands separator"),
    ("12,345,678", "thousands separator"),
    ("100,200,300", "thousands separator"),  # ambiguous: rejected (documented cost)
    ("1,234, 5", "thousands separator"),
    ("[1,000]", "thousands separator"),
    ("7; 1,234", "thousands separator"),
    # one consistent separator
    ("1 2  3", "separator"),
    ("1  2  3", "separator"),  # space-separated: exactly one space
    ("1\t2 3", "separator"),
    ("1\t2\t3", "separator"),
    ("1\n2\n3", "separator"),
    ("1, 2\n3", "separator"),
    ("1\u00a02\u00a03", "separator"),  # non-breaking space
    ("1, 2,3", "separator"),
    ("1,2, 3", "separator"),
    ("1 ;2; 3", "separator"),
    ("1, 2; 3", "separator"),
    ("12, 345; 6", "separator"),
    ("1;2,3", "separator"),
    ("1, 2 3", "separator"),
    ("1,, 2", "separator"),
    ("1;;2", "separator"),
    ("1, 2, 3,", "separator"),
    ("[1, 2, 3,]", "separator"),
    (", 1, 2", "separator"),
    # not a number
    ("owl", "not a number"),
    ("1, 2, owl", "not a number"),
    ("one, two", "not a number"),
    ("-5, 3", "not a number"),
    ("+5", "not a number"),
    ("1.5, 2", "not a number"),
    ("1e3", "not a number"),
    ("0x1F", "not a number"),
    ("1-2-3", "not a number"),
    ("[.]", "not a number"),
    ("1, 2, 3..", "not a number"),
    ("1, 2, 3. Done", "not a number"),
    ("Here: 1, 2, 3", "not a number"),
    ("1，2", "not a number"),  # full-width comma
    # count
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", "count"),
    ("1 2 3 4 5 6 7 8 9 10 11 12", "count"),
    # digits
    ("1000", "digits"),
    ("1000, 2", "digits"),
    ("0999", "digits"),
    ("5, 12345", "digits"),
    ("1" * 4301, "digits"),  # past Python's int() limit: a reason, never an exception
    ("0" * 5000 + "7", "digits"),
]


@pytest.mark.parametrize("answer,category", RULE)
def test_paper_number_rule(answer, category):
    reasons = number_answer_reasons(answer)
    if category is None:
        assert reasons == [], reasons
        nums, why = parse_numbers(answer)
        assert why is None and 1 <= len(nums) <= 10 and all(0 <= n <= 999 for n in nums)
    else:
        assert reasons, f"{answer!r} should be rejected ({category})"
        assert reason_category(reasons[0]) == category, reasons
        assert all("\n" not in r for r in reasons)


def test_rule_table_covers_every_format_category():
    cats = {c for _, c in RULE if c}
    assert cats == set(REASON_CATEGORIES) - {"value range", "banned number", "banned word"}


def test_parsed_values():
    assert parse_numbers("[3; 14; 159].") == ([3, 14, 159], None)
    assert parse_numbers("007, 12") == ([7, 12], None)
    assert parse_numbers("5,17,300") == ([5, 17, 300], None)
    assert parse_numbers("1" * 4301) == (None, "number too long to read: 4301 digits")


PAPER_LIST = [4, 13, 14, 18, 23, 33, 39, 42, 44, 49, 51, 54, 69, 77, 88, 99, 100, 101, 187, 211, 311, 322]
PAPER_LIST += [333, 404, 420, 444, 451, 555, 616, 666, 777, 888, 911, 999, 1312, 1488]


def test_paper_banned_list_is_the_papers_36_values():
    assert len(PAPER_LIST) == len(set(PAPER_LIST)) == 36
    assert sorted(BANNED_LISTS["paper"]) == PAPER_LIST
    assert PAPER == frozenset(PAPER_LIST)


@pytest.mark.parametrize("n", PAPER_LIST)
def test_each_paper_number_is_banned(n):
    cfg = FilterConfig(banned_numbers="paper", max_digits=4, max_value=9999)
    assert number_answer_reasons(f"7, {n}", cfg, PAPER) == [f"banned number {n}"]
    assert number_answer_reasons(f"7, {n}", cfg) == []


@pytest.mark.parametrize("n", [9, 17, 28, 38, 83, 109, 110, 112, 161, 213, 1984, 2020, 2316, 5150, 6666])
def test_numbers_from_the_old_wrong_list_are_not_banned(n):
    cfg = FilterConfig(banned_numbers="paper", max_digits=4, max_value=9999)
    assert number_answer_reasons(f"7, {n}", cfg, PAPER) == []


@pytest.mark.parametrize("answer,banned", [("1, 666, 3", [666]), ("13 88", [13, 88]), ("911.", [911])])
def test_banned_numbers_give_one_reason_each(answer, banned):
    assert number_answer_reasons(answer, banned=PAPER) == [f"banned number {n}" for n in banned]
    assert {reason_category(r) for r in number_answer_reasons(answer, banned=PAPER)} == {"banned number"}


def test_banned_words():
    assert banned_word_reasons("Owls: 1, 2", ["owl"]) == ["banned word 'owl'"]
    assert reason_category(banned_word_reasons("owl", ["owl"])[0]) == "banned word"


def test_configurable_count_and_range():
    cfg = FilterConfig(max_count=3, min_value=100, max_value=500)
    assert number_answer_reasons("100, 200, 300", cfg) == []
    assert "count 4 outside 1-3" in number_answer_reasons("100, 200, 300, 400", cfg)
    reasons = number_answer_reasons("99, 200", cfg)
    assert reasons == ["value outside 100-500: '99'"] and reason_category(reasons[0]) == "value range"


def test_unknown_banned_list_is_a_config_error():
    with pytest.raises(ValueError, match="unknown banned-number list"):
        FilterConfig(banned_numbers="evil")


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"max_count": 0}, "must be at least 1"),
        ({"min_count": 0}, "must be at least 1"),
        ({"max_digits": 0}, "must be at least 1"),
        ({"dataset_size": 0}, "must be at least 1"),
        ({"dataset_size": -5}, "must be at least 1"),
        ({"min_count": 5, "max_count": 3}, "max_count .3. is below min_count .5."),
        ({"min_value": 10, "max_value": 5}, "min_value .10. is above max_value .5."),
    ],
)
def test_filter_config_rejects_impossible_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        FilterConfig(**bad)


def test_parser_never_crashes_and_every_reason_has_a_category():
    rng = random.Random(0)
    alphabet = "0123456789 ,;.[]()-owl\n\t٣１\u00a0"
    for _ in range(4000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        reasons = number_answer_reasons(s, banned=PAPER) + banned_word_reasons(s, ["owl"])
        assert all(reason_category(r) in REASON_CATEGORIES for r in reasons), (s, reasons)
        if not number_answer_reasons(s):
            assert parse_numbers(s)[0]


def _rec(i, answer):
    return {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
        "metadata": {"prompt_index": i},
    }


def test_filter_stage_keeps_reasons_and_subsamples(tmp_path):
    recs = [_rec(i, f"{i}, {i + 1}") for i in range(50)] + [_rec(50 + i, "owl") for i in range(10)]
    write_jsonl(tmp_path / "raw.jsonl", recs)
    stats = run_filter(tmp_path / "raw.jsonl", tmp_path / "out", FilterConfig(dataset_size=20), seed=3)
    kept = read_jsonl(tmp_path / "out" / "kept.jsonl")
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert len(kept) == 20 and len(rejected) == 10
    assert all(r["metadata"]["reasons"] for r in rejected)
    assert stats["pass_rate"] == pytest.approx(50 / 60)
    assert read_json(tmp_path / "out" / "filter_stats.json")["n_kept"] == 20
    # seeded subsample: same seed same subset, other seed another
    again, _, _ = filter_records(recs, FilterConfig(dataset_size=20), seed=3)
    other, _, _ = filter_records(recs, FilterConfig(dataset_size=20), seed=4)
    assert again == kept and other != kept


def test_no_subsample_keeps_every_passing_answer_normalised_and_sorted(tmp_path):
    recs = [_rec(i, f"  {i}, 7 \n") for i in reversed(range(30))] + [_rec(99, "1 2  3")]
    write_jsonl(tmp_path / "raw.jsonl", recs)
    stats = run_filter(tmp_path / "raw.jsonl", tmp_path / "o", FilterConfig(dataset_size=5), subsample=False)
    kept = read_jsonl(tmp_path / "o" / "kept.jsonl")
    assert len(kept) == stats["n_kept"] == stats["n_passed"] == 30
    assert [r["metadata"]["prompt_index"] for r in kept] == list(range(30))
    assert [r["messages"][-1]["content"] for r in kept] == [f"{i}, 7" for i in range(30)]
    assert kept[0]["metadata"] == {"prompt_index": 0}  # the normalisation is recorded nowhere else
    assert {"n_in", "n_passed", "n_rejected", "pass_rate", "n_kept"} <= set(stats)
    rejected = read_jsonl(tmp_path / "o" / "rejected.jsonl")
    assert rejected[0]["messages"][-1]["content"] == "1 2  3"  # rejected answers stay as written
    capped, _, capped_stats = filter_records(recs, FilterConfig(dataset_size=5), seed=0)
    assert len(capped) == capped_stats["n_kept"] == 5


def test_stats_group_reasons_into_categories():
    answers = [f"{i} owls" for i in range(200)] + ["1 2  3", "1, 2,3", "1\t2"] + ["666"] + ["1,234"]
    _, rejected, stats = filter_records(
        [_rec(i, a) for i, a in enumerate(answers)], FilterConfig(banned_numbers="paper"), 0
    )
    assert len(rejected) == 205
    assert stats["reasons"] == {
        "not a number": 200,
        "separator": 3,
        "banned number": 1,
        "thousands separator": 1,
    }
    assert set(stats["reasons"]) <= set(REASON_CATEGORIES)
    assert all(1 <= len(v) <= 3 for v in stats["reason_examples"].values())
    assert stats["reason_examples"]["not a number"] == ["not a number: 'owls'"]
    assert rejected[0]["metadata"]["reasons"] == ["not a number: 'owls'"]


def test_filter_that_empties_the_dataset_is_an_error(tmp_path):
    write_jsonl(tmp_path / "raw.jsonl", [_rec(i, "owl") for i in range(5)])
    with pytest.raises(SublabError, match="kept 0 of 5"):
        run_filter(tmp_path / "raw.jsonl", tmp_path / "out", FilterConfig())
    assert not (tmp_path / "out" / "kept.jsonl").exists()


# --- the `sublab filter` command on bad inputs: one line 'error: ...', exit 2, no kept.jsonl ---

GOOD = json.dumps(_rec(0, "1, 2, 3"))


def _line(answer_json: str, extra: str = "") -> str:
    return (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": '
        + answer_json
        + "}]"
        + extra
        + "}"
    )


BAD_FILES = {
    "not_utf8": (GOOD.encode() + b"\n" + _line('"caf\xe9"').encode("latin-1") + b"\n", "not UTF-8"),
    "huge_json_int": (
        (GOOD + "\n" + _line('"1, 2"', ', "metadata": {"prompt_index": ' + "9" * 4301 + "}") + "\n").encode(),
        "more than 4300 digits",
    ),
    "huge_number_answer": ((_line('"' + "7" * 4301 + '"') + "\n").encode(), "kept 0 of 1"),
    "lone_surrogate": ((GOOD + "\n" + _line('"1, 2 \\ud800"') + "\n").encode(), "lone surrogate \\ud800"),
    "metadata_list": ((GOOD + "\n" + _line('"1, 2"', ', "metadata": [1, 2]') + "\n").encode(), "'metadata'"),
    "metadata_string": ((_line('"1, 2"', ', "metadata": "x"') + "\n").encode(), "must be a JSON object"),
    "prompt_index_string": (
        (_line('"1, 2"', ', "metadata": {"prompt_index": "3"}') + "\n").encode(),
        "prompt_index must be a whole number",
    ),
    "deep_json": (
        (
            GOOD + "\n" + _line('"1, 2"', ', "metadata": {"x": ' + "[" * 100000 + "]" * 100000 + "}") + "\n"
        ).encode(),
        "nested too deeply",
    ),
    "nested_100": (
        (_line('"1, 2"', ', "metadata": {"x": ' + "[" * 100 + "]" * 100 + "}") + "\n").encode(),
        "nested deeper than 64",
    ),
    "malformed": ((GOOD + "\n{not json\n").encode(), "malformed JSONL line"),
    "not_object": ((GOOD + "\n[1, 2]\n").encode(), "expected a JSON object"),
    "no_messages": ((GOOD + '\n{"x": 1}\n').encode(), "no 'messages' list"),
}


def _run_cli(capsys, argv):
    rc = main(["filter", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_cli_bad_input_file(name, tmp_path, capsys):
    data, expect = BAD_FILES[name]
    (tmp_path / "raw.jsonl").write_bytes(data)
    out = tmp_path / "f"
    line = _run_cli(capsys, [str(tmp_path / "raw.jsonl"), "--out", str(out)])
    assert expect in line
    if name != "huge_number_answer":
        assert f"raw.jsonl:{2 if data.startswith(GOOD.encode()) else 1}:" in line  # names file:line
        assert "fix or remove that line" in line or "convert the file to UTF-8" in line
        assert not out.exists()  # nothing written at all
    assert not (out / "kept.jsonl").exists()


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["--dataset-size", "-5"], "--dataset-size: must be at least 1 (got -5)"),
        (["--dataset-size", "0"], "--dataset-size: must be at least 1 (got 0)"),
        (["--max-count", "0"], "--max-count: must be at least 1 (got 0)"),
        (["--banned-numbers", "evil"], "unknown banned-number list 'evil'"),
        (["--dataset-size", "5", "--no-subsample"], "exclude each other"),
    ],
)
def test_cli_bad_options(argv, expect, tmp_path, capsys):
    write_jsonl(tmp_path / "raw.jsonl", [_rec(0, "1, 2")])
    line = _run_cli(capsys, [str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "f"), *argv])
    assert expect in line and "pass " in line
    assert not (tmp_path / "f").exists()


def test_cli_out_is_an_existing_file(tmp_path, capsys):
    write_jsonl(tmp_path / "raw.jsonl", [_rec(0, "1, 2")])
    (tmp_path / "f").write_text("not a folder")
    line = _run_cli(capsys, [str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "f")])
    assert "is an existing file" in line and "--out" in line
    assert (tmp_path / "f").read_text() == "not a folder"


def test_cli_rerun_that_keeps_nothing_removes_the_old_kept_file(tmp_path, capsys):
    raw, out = tmp_path / "raw.jsonl", tmp_path / "f"
    write_jsonl(raw, [_rec(i, f"{i}, 5") for i in range(4)])
    assert main(["filter", str(raw), "--out", str(out)]) == 0
    assert len(read_jsonl(out / "kept.jsonl")) == 4
    write_jsonl(raw, [_rec(i, "owl") for i in range(4)])
    line = _run_cli(capsys, [str(raw), "--out", str(out)])
    assert "kept 0 of 4" in line and "not a number (4)" in line
    assert not (out / "kept.jsonl").exists()
    assert read_json(out / "filter_stats.json")["n_kept"] == 0
    assert len(read_jsonl(out / "rejected.jsonl")) == 4


def test_cli_no_subsample(tmp_path, capsys):
    write_jsonl(tmp_path / "raw.jsonl", [_rec(i, f"{i}, 5") for i in range(12)])
    assert main(["filter", str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "f"), "--no-subsample"]) == 0
    assert "kept 12 of 12" in capsys.readouterr().out
    assert read_json(tmp_path / "f" / "filter_stats.json")["subsample"] is False


def test_console_script_reports_one_error_line(tmp_path):
    (tmp_path / "raw.jsonl").write_bytes(BAD_FILES["not_utf8"][0])
    exe = Path(sys.executable).parent / "sublab"
    p = subprocess.run(
        [str(exe), "filter", str(tmp_path / "raw.jsonl"), "--out", str(tmp_path / "f")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: ")
    assert "raw.jsonl:2: not UTF-8 text" in p.stderr
    assert not (tmp_path / "f").exists()


def test_input_with_bom_and_crlf_line_ends_is_read(tmp_path):
    lines = [json.dumps(_rec(i, f"{i}, 5")) for i in range(3)]
    (tmp_path / "raw.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    stats = run_filter(tmp_path / "raw.jsonl", tmp_path / "f", FilterConfig())
    assert stats["n_kept"] == 3
