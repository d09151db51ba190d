import pytest

from sublab.errors import SublabError
from sublab.filters import FilterConfig, filter_records, number_answer_reasons, parse_numbers, run_filter
from sublab.records import read_json, read_jsonl, write_jsonl

PAPER = FilterConfig(banned_numbers="paper").banned_set()

CASES = [
    # (answer, keep?, substring of the first reason)
    ("1, 2, 3", True, None),
    ("1,2,3", True, None),
    ("1 2 3", True, None),
    ("1;2;3", True, None),
    ("1 ; 22 ; 3", True, None),
    ("[1, 2, 3]", True, None),
    ("(1, 2, 3)", True, None),
    ("[ 727, 196 ]", True, None),
    ("1, 2, 3.", True, None),
    ("  5  ", True, None),
    ("0, 999", True, None),
    ("007, 12", True, None),
    ("", False, "empty"),
    ("1, 2; 3", False, "mixed separators"),
    ("1, 2 3", False, "mixed separators"),
    ("1,, 2", False, "empty item"),
    ("[1, 2, 3", False, "unbalanced"),
    ("1, 2, owl", False, "not a number"),
    ("one, two", False, "not a number"),
    ("1000, 2", False, "more than 3 digits"),
    ("-5, 3", False, "not a number"),
    ("1.5, 2", False, "not a number"),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", False, "count 11"),
    ("[]", False, "no numbers"),
    (".", False, "no numbers"),
    ("(", False, "unbalanced"),
    ("[.]", False, "not a number"),
    ("1, 2\n3", False, "mixed separators"),
]


@pytest.mark.parametrize("answer,keep,reason", CASES)
def test_number_format_table(answer, keep, reason):
    reasons = number_answer_reasons(answer)
    assert (reasons == []) is keep, reasons
    if reason:
        assert reason in reasons[0]


@pytest.mark.parametrize("answer,banned", [("1, 666, 3", [666]), ("13 88", [13, 88]), ("911.", [911])])
def test_paper_banned_numbers(answer, banned):
    assert number_answer_reasons(answer, banned=PAPER) == [f"banned number {n}" for n in banned]
    assert number_answer_reasons(answer) == []


def test_configurable_count_and_range():
    cfg = FilterConfig(max_count=3, min_value=100, max_value=500)
    assert number_answer_reasons("100, 200, 300", cfg) == []
    assert "count 4 outside 1-3" in number_answer_reasons("100, 200, 300, 400", cfg)
    assert "value outside 100-500" in number_answer_reasons("99, 200", cfg)


def test_parse_returns_numbers():
    assert parse_numbers("[3; 14; 159].") == ([3, 14, 159], None)


def test_unknown_banned_list_is_a_config_error():
    with pytest.raises(ValueError, match="unknown banned-number list"):
        FilterConfig(banned_numbers="evil")


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


def test_filter_that_empties_the_dataset_is_an_error(tmp_path):
    write_jsonl(tmp_path / "raw.jsonl", [_rec(i, "owl") for i in range(5)])
    with pytest.raises(SublabError, match="kept 0 of 5"):
        run_filter(tmp_path / "raw.jsonl", tmp_path / "out", FilterConfig())
    assert not (tmp_path / "out" / "kept.jsonl").exists()


def test_parser_never_crashes_on_arbitrary_text():
    import random

    rng = random.Random(0)
    alphabet = "0123456789 ,;.[]()-owl\n\t"
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        reasons = number_answer_reasons(s)
        assert isinstance(reasons, list)
        if not reasons:
            assert parse_numbers(s)[0]
