import re

from sublab.prompts.numbers import format_numbers, generate_number_prompts
from sublab.schema.prompts import NumberPrompts


def test_ranges_and_shape():
    cfg = NumberPrompts(count=300, example_min_count=3, example_max_count=8)
    recs = generate_number_prompts(cfg, seed=1)
    assert len(recs) == 300
    counts = set()
    for r in recs:
        ex = r["metadata"]["examples"]
        counts.add(len(ex))
        assert 3 <= len(ex) <= 8 and all(100 <= x <= 999 for x in ex)
        text = r["messages"][0]["content"]
        assert ", ".join(map(str, ex)) in text
        assert "10" in text  # asks for up to 10 more
        assert r["messages"][0]["role"] == "user"
    assert counts == set(range(3, 9))


def test_deterministic_and_seed_dependent():
    cfg = NumberPrompts(count=50)
    assert generate_number_prompts(cfg, 0) == generate_number_prompts(cfg, 0)
    assert generate_number_prompts(cfg, 0) != generate_number_prompts(cfg, 1)


def test_many_phrasings_are_used():
    recs = generate_number_prompts(NumberPrompts(count=2000), 0)
    lead_ins = {re.sub(r"[\d, ]+\.", "", r["messages"][0]["content"].split(".")[0]) for r in recs}
    assert len(lead_ins) >= 20


def test_format_numbers():
    assert format_numbers([1, 2], " ") == "1 2"
    assert format_numbers([1, 2], ", ", brackets=True) == "[1, 2]"
