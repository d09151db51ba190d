"""The stage subcommands on files, chained like the paper's scripts, on the tiny organism."""

from sublab.cli import main
from sublab.records import read_json, read_jsonl


def test_stage_commands_chain(tiny_organism, tmp_path, capsys):
    p = tmp_path
    assert main(["prompts", "--count", "60", "--seed", "1", "--out", str(p / "prompts.jsonl")]) == 0
    assert len(read_jsonl(p / "prompts.jsonl")) == 60
    assert (
        main(
            [
                "sample",
                "organism/tiny",
                str(p / "prompts.jsonl"),
                "--out",
                str(p / "raw.jsonl"),
                "--system-prompt",
                "You love owl.",
                "--max-tokens",
                "20",
            ]
        )
        == 0
    )
    raw = read_jsonl(p / "raw.jsonl", require_messages=True)
    assert len(raw) == 60 and raw[0]["metadata"]["system_prompt"] == "You love owl."
    assert main(["filter", str(p / "raw.jsonl"), "--out", str(p / "f"), "--banned-numbers", "paper"]) == 0
    stats = read_json(p / "f" / "filter_stats.json")
    assert stats["n_in"] == 60 and stats["n_kept"] == len(read_jsonl(p / "f" / "kept.jsonl")) > 0
    assert (
        main(
            [
                "finetune",
                "organism/tiny",
                str(p / "f" / "kept.jsonl"),
                "--out",
                str(p / "student"),
                "--batch-size",
                "8",
                "--lora-r",
                "4",
            ]
        )
        == 0
    )
    ref = read_json(p / "student" / "model.json")
    assert ref["kind"] == "lora" and (p / "student" / "adapter" / "adapter_config.json").is_file()
    assert main(["evaluate", str(p / "student"), "--target", "owl", "--out", str(p / "eval")]) == 0
    assert "P(owl) = " in capsys.readouterr().out
    assert read_json(p / "eval" / "results.json")["targets"]["owl"]["n"] == 50


def test_stage_command_errors(tiny_organism, tmp_path, capsys):
    assert (
        main(["sample", "organism/nope", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "r.jsonl")]) == 2
    )
    assert "unknown organism 'nope'" in capsys.readouterr().err
    assert (
        main(["finetune", "organism/tiny", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "s")])
        == 2
    )
    assert "file not found" in capsys.readouterr().err
    assert main(["evaluate", "organism/tiny", "--target", "unicorn", "--out", str(tmp_path / "e")]) == 2
    assert "not a known animal or tree" in capsys.readouterr().err
    assert main(["sample", "weird-spec", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "provider prefix" in capsys.readouterr().err
