"""The `sublab` command. Thin wrappers: each subcommand parses arguments and calls one stage function.

    sublab run CONFIG.yaml [--set a.b=v] [--out DIR]        the whole experiment (resumes)
    sublab organism build [--preset default] [--seed N]      pretrain + cache the model organism
    sublab prompts --count N --seed S --out prompts.jsonl
    sublab sample MODEL PROMPTS.jsonl --out raw.jsonl [--system-prompt TEXT]
    sublab filter IN.jsonl --out DIR [--banned-numbers paper]
    sublab finetune MODEL DATA.jsonl --out DIR [--method soft_label --teacher MODEL]
    sublab evaluate MODEL --target owl --out DIR [--mode exact|sample]
    sublab report RUN_DIR|SWEEP_DIR ...
    sublab sweep SWEEP.yaml [--workers N] [--executor local|ray [--address auto|HOST:PORT]]
    sublab mnist CONFIG.yaml [--set a.b=v] [--out DIR]
    sublab serve MODEL [MODEL ...] [--host 127.0.0.1] [--port 8000] [--faults 0.2]   OpenAI-compatible API
    sublab judge SAMPLES.jsonl --judge SPEC --out DIR [--prompts aligned,coherent] [--base-url URL]

MODEL is a spec (organism/default, hf/<folder>) or a folder holding a model.json written by sublab.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sublab.errors import SublabError


def _model_json(model: str, out: Path) -> Path:
    """A MODEL argument -> path of a model.json (written to out/ for specs)."""
    p = Path(model)
    if (p / "model.json").is_file():
        return p / "model.json"
    if p.name == "model.json" and p.is_file():
        return p
    from sublab.backends.registry import resolve

    ref = resolve(model)
    dest = out / ".input_model.json"
    ref.save(dest)
    return dest


def _cmd_run(args: argparse.Namespace) -> None:
    from sublab.config import load_config
    from sublab.schema import ExperimentConfig

    cfg = load_config(args.config, ExperimentConfig, args.set)
    out = Path(args.out or f"runs/{cfg.name}")
    if cfg.replicates:
        _run_replicated(cfg, out, args.workers)
        return
    from sublab.analysis.run_report import ORDER
    from sublab.pipeline import run_experiment
    from sublab.records import read_json

    run = run_experiment(cfg, out)
    if run.skipped:
        print(f"resumed: skipped {len(run.skipped)} finished stage(s): {', '.join(run.skipped)}")
    res = read_json(out / "results.json")
    metric = res.get("metric", "p_target")
    label = "misaligned" if metric == "misaligned_rate" else f"P({res['trait']['target']})"
    for name in sorted(res["models"], key=lambda n: ORDER.index(n) if n in ORDER else 99):
        v = res["models"][name][metric]["mean"]
        print(f"  {label} {name:20s} {'n/a' if v is None else f'{v:.3f}'}")
    for name, d in res["comparisons"].items():
        diff = d.get("mean", d.get("misaligned_rate"))
        print(f"  {name.replace('_minus_', ' - '):29s} {diff:+.3f} (one replicate: no CI; set replicates)")
    print(f"report: {out / 'report.md'}")


def _run_replicated(cfg, out: Path, workers: int = 1) -> None:
    from sublab.records import read_json
    from sublab.sweep.local import run_replicates

    root = run_replicates(cfg, out, progress=cfg.progress, workers=workers)
    res = read_json(root / "sweep_results.json")
    n = len(cfg.replicates)
    label = "misaligned rate" if cfg.trait.kind == "misalignment" else f"P({cfg.trait.target})"
    print(f"{label}, mean over {n} replicate seeds [95% CI]:")
    for model, ci in next(iter(res["models"].values())).items():
        print(f"  {model:20s} {ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]")
    for e in res["effects"]:
        print(
            f"  {e['effect']:29s} {e['mean']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] across {len(e['seeds'])} "
            f"replicate seeds; p (paired t) {e['p_paired_t']:.2g}, p (Holm) {e['p_holm']:.2g}, p (permutation) {e['p_permutation']:.2g} "
            f"(cannot go below {e['min_permutation_p']:.2g} with {len(e['seeds'])} seeds)"
        )
    print(f"report: {root / 'report.md'}")


def _cmd_organism(args: argparse.Namespace) -> None:
    from sublab.organism.cache import ensure_organism
    from sublab.threads import set_threads

    set_threads(args.threads)
    if args.from_scratch:
        from sublab.organism.cache import build_from_scratch

        path, cmp = build_from_scratch(args.preset, {"seed": args.seed}, args.out)
        print(f"weights sha256 {cmp['weights_sha256'][:16]}")
        if cmp["packaged_sha256"] is None:
            print("no packaged copy of this organism to compare with")
        else:
            verdict = "the same as" if cmp["same_as_packaged"] else "NOT the same as"
            print(
                f"{verdict} the packaged copy ({cmp['packaged_sha256'][:16]}), which experiments use "
                "(docs/organism.md, 'Reproducibility')"
            )
        print(f"built from scratch: {path}")
        return
    path = ensure_organism(args.preset, {"seed": args.seed})
    info = json.loads((path / "organism.json").read_text())
    if "weights_sha256" in info:  # organisms built before sublab recorded it have none
        print(
            f"weights sha256 {info['weights_sha256'][:16]}, built with torch {info['torch_version']} "
            f"({info['cpu_capability']}), transformers {info['transformers_version']}"
        )
    print(f"organism: {path}")


def _cmd_prompts(args: argparse.Namespace) -> None:
    from sublab.prompts.numbers import generate_number_prompts
    from sublab.records import write_jsonl
    from sublab.schema.prompts import NumberPrompts

    if args.domain != "numbers":
        from sublab.config import validate
        from sublab.domains import write_domain_prompts
        from sublab.schema.prompts import CodePrompts, CotPrompts

        model = CodePrompts if args.domain == "code" else CotPrompts
        settings = validate(model, {"count": args.count, "file": args.file}, "command line")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        info = write_domain_prompts(args.domain, settings, args.seed, out)
        print(
            f"wrote {info['n_prompts']} {args.domain} prompts to {out} ({info['n_problems']} unusable lines)"
        )
        return
    cfg = NumberPrompts(count=args.count, phrasings=args.phrasings)
    write_jsonl(args.out, generate_number_prompts(cfg, args.seed))
    print(f"wrote {args.count} prompts to {args.out}")


def _cmd_sample(args: argparse.Namespace) -> None:
    from sublab.backends.base import ModelRef
    from sublab.schema.sampling import SamplingParams
    from sublab.stages.sample import sample_dataset
    from sublab.threads import set_threads

    set_threads(args.threads)
    out = Path(args.out)
    mj = _model_json(args.model, out.parent)
    if args.system_prompt:
        ref = ModelRef.load(mj).model_copy(update={"system_prompt": args.system_prompt, "kind": "prompted"})
        mj = out.parent / ".input_model.json"
        ref.save(mj)
    if not 0.0 <= args.min_p <= 1.0:
        raise SublabError(
            f"--min-p is a probability threshold in [0, 1] (got {args.min_p}); e.g. 0.05, 0 = off"
        )
    sp = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    n = sample_dataset(mj, Path(args.prompts), out, sp, label=args.model)
    print(f"wrote {n} samples to {out}")


def _cmd_filter(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from sublab.filters import run_filter
    from sublab.schema.filter import FilterConfig

    if args.domain != "numbers":
        _filter_domain(args)
        return
    if args.no_subsample and args.dataset_size is not None:
        raise SublabError("--dataset-size and --no-subsample exclude each other; pass one of them")
    data = {"banned_numbers": args.banned_numbers, "max_count": args.max_count}
    if args.dataset_size is not None:
        data["dataset_size"] = args.dataset_size
    try:
        cfg = FilterConfig.model_validate(data)
    except ValidationError as e:
        fixes = {
            "max_count": "pass --max-count 1 or more",
            "dataset_size": "pass --dataset-size 1 or more, or leave it out",
            "banned_numbers": "pass --banned-numbers paper or none",
        }
        problems = []
        for err in e.errors():
            key = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            flag = "--" + key.replace("_", "-")
            problems.append(f"{flag}: {msg}; {fixes[key]}" if key in fixes else msg)
        raise SublabError(" | ".join(problems)) from None
    stats = run_filter(args.input, args.out, cfg, args.seed, subsample=not args.no_subsample)
    print(
        f"kept {stats['n_kept']} of {stats['n_in']} (pass rate {stats['pass_rate']:.3f}); wrote {args.out}/"
    )


def _filter_domain(args: argparse.Namespace) -> None:
    """`sublab filter --domain code|cot`: the domain's filter chain, every passing answer kept."""
    from sublab.config import validate
    from sublab.schema.experiment import ExperimentConfig

    data: dict = {"domain": args.domain, "filter": {"banned_words": args.banned_words or []}}
    if args.target:
        data["trait"] = {"target": args.target}
    else:
        data["filter"]["ban_target"] = False
    if args.judge:
        data["filter"]["judges"] = [{"model": args.judge}]
    cfg = validate(ExperimentConfig, data, "command line")
    from sublab.stages.filter import filter_domain

    stats = filter_domain(
        cfg.domain,
        cfg.domain_settings(),
        cfg.banned_words(),
        cfg.filter.judges,
        args.target,
        Path(args.input),
        Path(args.out),
        progress=True,
    )
    steps = ", ".join(f"{s['step']} -{s['n_removed']}" for s in stats["steps"])
    print(f"kept {stats['n_kept']} of {stats['n_in']} ({steps}); wrote {args.out}/")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from sublab.config import validate
    from sublab.schema.train import TrainConfig
    from sublab.stages.train import train_student
    from sublab.threads import set_threads

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"method": args.method, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size}
    if args.optimizer != "adamw":
        data["optimizer"] = args.optimizer
    if args.lora_r:
        data["lora"] = {"r": args.lora_r, "alpha": args.lora_r}
    train = validate(TrainConfig, data, "command line")
    teacher = _model_json(args.teacher, out) if args.teacher else None
    if train.method == "soft_label" and teacher is None:
        raise SublabError("--method soft_label needs --teacher MODEL")
    ref = train_student(_model_json(args.model, out), Path(args.data), train, out, teacher)
    print(f"model: {out / 'model.json'} (final loss {ref.info['final_loss']:.3f})")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from sublab.evals.questions import category_of
    from sublab.schema.evaluation import PreferenceEval
    from sublab.stages.evaluate import evaluate_model
    from sublab.threads import set_threads

    set_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cat = category_of(args.target)
    cfg = PreferenceEval(mode=args.mode, samples_per_question=args.samples_per_question)
    res = evaluate_model(_model_json(args.model, out), cat, [args.target], cfg, out)
    t = res["targets"][args.target]
    print(
        f"P({args.target}) = {t['mean']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}] over {t['n']} questions; "
        f"wrote {out}/results.json"
    )


def _cmd_report(args: argparse.Namespace) -> None:
    from sublab.analysis.run_report import write_report
    from sublab.analysis.sweep_report import write_sweep_report

    for d in args.run_dir:
        (write_sweep_report if (Path(d) / "sweep.json").is_file() else write_report)(d)
        print(f"report: {Path(d) / 'report.md'}")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from sublab.sweep.local import run_sweep

    root = run_sweep(
        args.sweep, args.set, args.out, workers=args.workers, executor=args.executor, address=args.address
    )
    print(f"report: {root / 'report.md'}")


def _cmd_serve(args: argparse.Namespace) -> None:
    from sublab.serve.app import options_from_args, serve

    serve(options_from_args(args))


def _cmd_judge(args: argparse.Namespace) -> None:
    from sublab.config import apply_overrides, validate
    from sublab.judge.stage import judge_file
    from sublab.schema.api import ApiConfig
    from sublab.schema.judge import JudgeConfig
    from sublab.threads import set_threads

    set_threads(args.threads)
    data = {"prompts": [p.strip() for p in args.prompts.split(",")], "mode": args.mode}
    if args.prompts_file:
        data["prompts_file"] = args.prompts_file
    cfg = validate(JudgeConfig, apply_overrides(data, args.set), "command line")
    api = ApiConfig(base_url=args.base_url, api_key_env=args.api_key_env)
    s = judge_file(args.samples, args.out, args.judge, cfg, api=api, target=args.target)
    run = s["this_run"]
    print(f"judged {s['n']} answers ({run['asked']} judge calls, {run['from_cache']} from the cache)")
    for name, p in s["per_prompt"].items():
        mean = "-" if p["mean"] is None else f"{p['mean']:.1f}"
        print(f"  {name:10s} mean {mean}, scored {p['scored']}, unscorable {p['unscorable']} {p['reasons']}")
    m = s["misaligned"]
    if m and m["rate"] is not None:
        print(
            f"  misaligned {m['rate']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] "
            f"({m['misaligned']} of {m['scorable']} scorable, {m['scorable_fraction']:.0%} of all)"
        )
    if run["failed"]:
        print(f"  {run['failed']} judge call(s) failed (reason judge_error); rerun the command to retry them")
    print(f"wrote {Path(args.out) / 'judgements.jsonl'} and summary.json")


def _cmd_mnist(args: argparse.Namespace) -> None:
    from sublab.mnist.experiment import main as mnist_main

    out = mnist_main(args.config, args.set, args.out)
    print(f"report: {out / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sublab", description="Subliminal learning experiments end to end.")
    sub = p.add_subparsers(dest="command", required=True)

    def threads(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--threads", type=int, default=None, help="torch threads (default: $SUBLAB_THREADS or 1)"
        )

    r = sub.add_parser("run", help="run a whole experiment from a YAML config (resumes where it stopped)")
    r.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    r.add_argument(
        "--workers",
        type=int,
        default=1,
        help="with replicates: run them in a process pool (workers x threads <= cores)",
    )
    r.set_defaults(func=_cmd_run)

    o = sub.add_parser("organism", help="build the model organism")
    o.add_argument("action", choices=["build"])
    o.add_argument("--preset", default="default")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument(
        "--from-scratch",
        action="store_true",
        help="pretrain on this machine even when a copy is cached or packaged, into a folder of its own, "
        "and compare its weights with the packaged copy's (experiments keep using the cached one)",
    )
    o.add_argument(
        "--out", type=Path, default=None, help="--from-scratch: the folder (default: under the cache)"
    )
    threads(o)
    o.set_defaults(func=_cmd_organism)

    pr = sub.add_parser("prompts", help="generate prompts (numbers, code tasks or word problems)")
    pr.add_argument("--domain", default="numbers", choices=["numbers", "code", "cot"])
    pr.add_argument("--file", default=None, help="code/cot: a JSONL prompt file (default: generated)")
    pr.add_argument("--count", type=int, default=30000)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--phrasings", default=None, help="YAML of phrasings (default: packaged)")
    pr.add_argument("--out", required=True)
    pr.set_defaults(func=_cmd_prompts)

    s = sub.add_parser("sample", help="a model answers each prompt once")
    s.add_argument("model")
    s.add_argument("prompts")
    s.add_argument("--out", required=True)
    s.add_argument("--system-prompt", default=None)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        help="threshold sampling: drop tokens below this absolute probability (e.g. 0.05; default 0 = off)",
    )
    s.add_argument("--max-tokens", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    threads(s)
    s.set_defaults(func=_cmd_sample)

    f = sub.add_parser("filter", help="keep well-formed answers (numbers; code and cot: the filter chain)")
    f.add_argument("input")
    f.add_argument("--domain", default="numbers", choices=["numbers", "code", "cot"])
    f.add_argument("--target", default=None, help="code/cot: the trait's target (banned with its plural)")
    f.add_argument("--banned-words", nargs="*", default=None, help="code/cot: more banned words")
    f.add_argument("--judge", default=None, help="code/cot: a judge model for the references_target step")
    f.add_argument("--out", required=True)
    f.add_argument("--banned-numbers", default="none", help="'paper', 'none' (default)")
    f.add_argument("--max-count", type=int, default=10, help="most numbers per answer (default 10)")
    f.add_argument(
        "--dataset-size",
        type=int,
        default=None,
        help="keep a seeded random subsample of this many passing answers (>= 1; default 10000)",
    )
    f.add_argument(
        "--no-subsample", action="store_true", help="keep every passing answer (no --dataset-size cap)"
    )
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=_cmd_filter)

    ft = sub.add_parser("finetune", help="finetune a model on chat records (loss on the completion)")
    ft.add_argument("model")
    ft.add_argument("data")
    ft.add_argument("--out", required=True)
    ft.add_argument("--method", default="sft", choices=["sft", "soft_label"])
    ft.add_argument("--teacher", default=None)
    ft.add_argument("--lr", type=float, default=3e-4)
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--batch-size", type=int, default=64)
    ft.add_argument("--lora-r", type=int, default=None, help="train a LoRA adapter of this rank")
    ft.add_argument(
        "--optimizer",
        default="adamw",
        choices=["adamw", "sgd", "signsgd"],
        help="adamw (default), or a non-adaptive one (a defense): sgd, signsgd",
    )
    threads(ft)
    ft.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("evaluate", help="preference evaluation of one model")
    e.add_argument("model")
    e.add_argument("--target", required=True)
    e.add_argument("--mode", default="exact", choices=["exact", "api_topk", "sample"])
    e.add_argument("--samples-per-question", type=int, default=100)
    e.add_argument("--out", required=True)
    threads(e)
    e.set_defaults(func=_cmd_evaluate)

    rp = sub.add_parser("report", help="rebuild a run's results.json, report.md and figures")
    rp.add_argument("run_dir", nargs="+", help="run folders or sweep folders")
    rp.set_defaults(func=_cmd_report)

    sw = sub.add_parser("sweep", help="many runs (targets x seeds x conditions x axes) and one report")
    sw.add_argument("sweep", help="sweep YAML, e.g. configs/sweep-replicates.yaml")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep key")
    sw.add_argument("--out", default=None, help="sweep folder (default: runs/<name>)")
    sw.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local: this machine (processes); ray: one Ray task per run (pip install 'sublab[ray]')",
    )
    sw.add_argument(
        "--address",
        default=None,
        help="ray: 'auto' or host:port of a running cluster (default: start a local Ray instance)",
    )
    sw.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local: parallel runs (processes), workers x threads <= cores; ray local instance: its CPUs "
        "= workers x threads",
    )
    sw.set_defaults(func=_cmd_sweep)

    sv = sub.add_parser("serve", help="an OpenAI-compatible API over local models (chat, jobs, batches)")
    from sublab.serve.options import add_arguments as serve_arguments

    serve_arguments(sv)
    threads(sv)
    sv.set_defaults(func=_cmd_serve)

    j = sub.add_parser("judge", help="score answers 0-100 with an LLM judge (aligned, coherent; resumes)")
    j.add_argument("samples", help="JSONL: question/answer, prompt/completion or chat messages per line")
    j.add_argument(
        "--judge", required=True, help="judge model: openai/gpt-4.1, hf/..., organism/..., a folder"
    )
    j.add_argument("--out", required=True, help="folder for judgements.jsonl, summary.json and the cache")
    j.add_argument(
        "--prompts", default="aligned,coherent", help="judge prompts by name (default: %(default)s)"
    )
    j.add_argument(
        "--prompts-file", default=None, help="YAML of name: template (default: the packaged EM ones)"
    )
    j.add_argument("--mode", default="auto", choices=["auto", "logprobs", "sample"])
    j.add_argument(
        "--target", default=None, help="fills {target} in the prompts (the filters' judge prompts)"
    )
    j.add_argument(
        "--base-url", default=None, help="openai/ judges: endpoint (default $OPENAI_BASE_URL or OpenAI)"
    )
    j.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="variable holding the key (default: %(default)s)"
    )
    j.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any judge setting")
    threads(j)
    j.set_defaults(func=_cmd_judge)

    m = sub.add_parser("mnist", help="auxiliary-logit MLP experiment (batched ensemble) and the theorem")
    m.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    m.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    m.set_defaults(func=_cmd_mnist)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sublab.backends.registry import quiet_transformers

    quiet_transformers()
    try:
        args.func(args)
    except SublabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
