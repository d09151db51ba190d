"""Config-level defenses and controls: the student's optimizer (sgd, signsgd: one step moves
the weights exactly as the update rule says), threshold sampling (min_p: an absolute probability
floor; tokens below it never come out, the rest are renormalised, 0 = the old samples) and shuffled
numbers (within / across answers: multisets, counts and formats kept; none = the old files), with the
clear errors of the backends that cannot do them, and one tiny experiment with all three switched on."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_experiment
from pydantic import ValidationError

from sublab.backends.base import ModelRef
from sublab.backends.hf import HFBackend, finetune_hf, load_hf
from sublab.backends.hf_generate import _filter_top_p, _sample_rows, _uniforms, generate_ids, prompt_ids_for
from sublab.backends.hf_train import (
    SignSGD,
    TrainSettings,
    encode_completion,
    make_optimizer,
    train_causal_lm,
)
from sublab.backends.openai_backend import OpenAIBackend
from sublab.backends.openai_finetune import finetune_remote
from sublab.backends.vllm_backend import VLLMBackend
from sublab.config import validate
from sublab.errors import SublabError
from sublab.filters import number_answer_reasons
from sublab.organism.pretrain import make_model
from sublab.organism.recipe import OrganismRecipe
from sublab.pipeline import run_experiment
from sublab.records import read_json, read_jsonl, write_jsonl
from sublab.schema import ExperimentConfig
from sublab.schema.filter import FilterConfig
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig
from sublab.stages.filter import equal_subsample, shuffle_numbers

pytestmark = pytest.mark.usefixtures("default_device")


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    r = OrganismRecipe(seed=seed, d_model=32, heads=2, d_ff=64, layers=1)
    return make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id)


def chat(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def number_records(n: int) -> list[dict]:
    return [
        {"messages": chat(f"Here are some numbers: {i}.", f"{i + 1}, {i + 2}, {i + 3}")} for i in range(n)
    ]


# ---- schema ---------------------------------------------------------------------------------------


def test_defaults_and_validation():
    t, s, f = TrainConfig(), SamplingParams(), FilterConfig()
    assert (t.optimizer, t.momentum, s.min_p, f.shuffle) == ("adamw", 0.0, 0.0, "none")
    assert TrainConfig(optimizer="sgd", momentum=0.9).momentum == 0.9
    with pytest.raises(ValidationError, match="momentum"):
        TrainConfig(momentum=0.9)  # adamw has no momentum setting
    with pytest.raises(ValidationError, match="momentum"):
        TrainConfig(optimizer="sgd", momentum=1.0)
    with pytest.raises(ValidationError):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValidationError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValidationError):
        FilterConfig(shuffle="sideways")
    # the default optimizer is the AdamW it always was
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(p, TrainSettings(lr=1e-3, weight_decay=0.1))
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 1e-3
    assert opt.defaults["weight_decay"] == 0.1 and opt.defaults["betas"] == (0.9, 0.999)


# ---- optimizers -----------------------------------------------------------------------------------


def test_sgd_and_signsgd_by_hand_on_a_small_parameter():
    """Two numbers worked out by hand: sgd p - lr g (+ wd p in the gradient), signsgd p (1 - lr wd) -
    lr sign(g), with sign(0) = 0."""
    for name, wd, want in [
        ("sgd", 0.0, [1.0 - 0.1 * 0.5, -2.0 - 0.1 * -3.0, 0.5]),
        ("sgd", 0.5, [1.0 - 0.1 * (0.5 + 0.5), -2.0 - 0.1 * (-3.0 - 1.0), 0.5 - 0.1 * 0.25]),
        ("signsgd", 0.0, [0.9, -1.9, 0.5]),
        ("signsgd", 0.5, [1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1, 0.5 * 0.95]),
    ]:
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        p.grad = torch.tensor([0.5, -3.0, 0.0])
        make_optimizer([p], TrainSettings(lr=0.1, optimizer=name, weight_decay=wd)).step()
        assert p.detach().tolist() == pytest.approx(want, abs=1e-7), (name, wd)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer([p], TrainSettings(lr=0.1, optimizer="lion"))


def snapshot_steps(model, tok, settings: TrainSettings) -> tuple[dict, list[dict]]:
    """Train a tiny model; the weights before, and per step the LR used, the gradient the optimizer
    saw (after clipping) and the weights after the step."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps: list[dict] = []

    def on_step(rec: dict) -> None:  # called after opt.step(): .grad still holds this step's gradient
        steps.append(
            {
                "lr": rec["lr"],
                "grad": {n: p.grad.clone() for n, p in model.named_parameters()},
                "after": {n: p.detach().clone() for n, p in model.named_parameters()},
            }
        )

    ex = [encode_completion(tok, r["messages"]) for r in number_records(8)]
    train_causal_lm(model, ex, settings, tok.pad_token_id, on_step=on_step)
    return before, steps


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def test_one_step_of_sgd_and_signsgd_on_a_tiny_model_follows_the_rule(tok):
    """One optimizer step through train_causal_lm (the LR is the warm-up's first, lr/2; clipping on):
    every weight tensor of the model moves exactly by the rule, computed here from the gradient the
    step left behind."""
    lr, wd = 1e-2, 0.1
    for name in ("sgd", "signsgd"):
        s = TrainSettings(lr=lr, batch_size=4, max_steps=1, warmup_steps=2, weight_decay=wd, optimizer=name)
        before, [st] = snapshot_steps(tiny_model(tok), tok, s)
        assert st["lr"] == pytest.approx(lr / 2)
        for n, p0 in before.items():
            g, eta = st["grad"][n], st["lr"]
            want = p0 - eta * (g + wd * p0) if name == "sgd" else p0 * (1 - eta * wd) - eta * torch.sign(g)
            assert close(st["after"][n], want), (name, n)
        # the small final-norm weight (32 numbers, all 1 at init): by hand, element by element
        g = st["grad"]["model.norm.weight"].tolist()
        got = st["after"]["model.norm.weight"].tolist()
        for gi, pi in zip(g, got, strict=True):
            eta = lr / 2
            want = 1 - eta * (gi + wd) if name == "sgd" else (1 - eta * wd) - eta * (gi > 0) + eta * (gi < 0)
            assert pi == pytest.approx(want, abs=1e-6)
        if name == "signsgd":  # every element with a gradient moved by lr/2 (after the decay)
            d = (st["after"]["model.norm.weight"] - (1 - lr / 2 * wd)).abs()
            assert torch.allclose(d, torch.full_like(d, lr / 2), atol=1e-6)


def test_sgd_momentum_over_two_steps(tok):
    """torch's SGD momentum (dampening 0): buf = mu buf + g; p -= lr buf."""
    mu, lr = 0.9, 1e-2
    s = TrainSettings(lr=lr, batch_size=4, max_steps=2, optimizer="sgd", momentum=mu)
    before, (s1, s2) = snapshot_steps(tiny_model(tok), tok, s)
    for n, p0 in before.items():
        p1 = p0 - s1["lr"] * s1["grad"][n]
        assert close(s1["after"][n], p1), n
        assert close(s2["after"][n], p1 - s2["lr"] * (mu * s1["grad"][n] + s2["grad"][n])), n
    assert (s1["lr"], s2["lr"]) == pytest.approx((lr, lr / 2))  # TrainSettings' linear decay over 2 steps


def test_signsgd_class_rejects_bad_settings():
    with pytest.raises(ValueError):
        SignSGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)


@pytest.fixture(scope="module")
def tiny_ref(tiny_organism):
    from sublab.backends.registry import resolve

    return resolve("organism/tiny", {"seed": 0}, progress=False)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "signsgd"])
def test_each_optimizer_finetunes_the_tiny_organism(tmp_path, tiny_ref, optimizer):
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    train = TrainConfig(lr=1e-3, max_steps=3, batch_size=8, optimizer=optimizer, **extra)
    ref = finetune_hf(tiny_ref, number_records(24), train, tmp_path / optimizer, progress=False)
    base = load_hf(tiny_ref)[0].state_dict()
    tuned = load_hf(ref)[0].state_dict()
    moved = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert len(moved) == len(base)  # every tensor moved
    lines = [json.loads(x) for x in (tmp_path / optimizer / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)


def test_api_finetune_refuses_another_optimizer(tmp_path):
    with pytest.raises(SublabError, match=r"train\.optimizer: signsgd.*adamw"):
        finetune_remote(None, number_records(2), TrainConfig(optimizer="signsgd"), tmp_path)


# ---- threshold sampling -----------------------------------------------------------------------------


PROBS = [0.30, 0.22, 0.15, 0.10, 0.07, 0.055, 0.045, 0.025, 0.015, 0.01, 0.007, 0.003]  # sums to 1


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution is PROBS at every position (the token ids 0..11; 99 is
    the end token, never produced): what threshold sampling must do is known exactly."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(PROBS, dtype=torch.float64).log().float())

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None
    ):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(b, t, -1), past_key_values=None)


def draw(min_p: float, n: int, temperature: float = 1.0, top_p: float = 1.0) -> list[int]:
    out = generate_ids(
        FixedLogits(), [[5, 6]] * n, list(range(n)), 99, 0, 1, temperature, top_p, n, min_p=min_p
    )
    return [x[0] for x in out]


def chi_square(counts: Counter, probs: dict[int, float], n: int) -> float:
    return sum((counts[k] - n * p) ** 2 / (n * p) for k, p in probs.items())


def test_min_p_drops_tokens_below_the_threshold_and_renormalises():
    """20,000 seeded draws at min_p 0.05 (absolute): tokens 0-5 (p >= 0.05) only, with frequencies of
    PROBS[:6] renormalised (chi-square, 5 d.o.f.: 99.9% quantile 20.5); without min_p every token shows
    up with its own frequency. A relative min_p (0.05 x 0.30 = 0.015) would have kept tokens 6-8 too."""
    assert sum(PROBS) == pytest.approx(1.0)
    n = 20000
    got = Counter(draw(0.05, n))
    assert set(got) == set(range(6))
    kept = {k: PROBS[k] / sum(PROBS[:6]) for k in range(6)}
    assert chi_square(got, kept, n) < 20.5
    base = Counter(draw(0.0, n))
    assert set(base) == set(range(12))
    assert chi_square(base, dict(enumerate(PROBS)), n) < 31.3  # 11 d.o.f., 99.9%
    # the threshold applies after temperature: at T = 0.5 the probabilities are p^2 / sum p^2
    sq = [p * p / sum(q * q for q in PROBS) for p in PROBS]
    above = [k for k, p in enumerate(sq) if p >= 0.05]
    assert above == [0, 1, 2, 3]
    got = Counter(draw(0.05, n, temperature=0.5))
    assert set(got) == set(above)
    assert chi_square(got, {k: sq[k] / sum(sq[j] for j in above) for k in above}, n) < 16.3  # 3 d.o.f.
    # a threshold above every token keeps the most likely one (never an empty distribution)
    assert set(draw(0.9, 200)) == {0}


def test_min_p_zero_gives_exactly_the_old_samples():
    """The sampler before min_p existed, verbatim: temperature, top_p, inverse CDF. min_p = 0 gives the
    same token for every row and every uniform, whatever the temperature and top_p."""

    def old(logits, temperature, top_p, u):
        if temperature <= 0 or u is None:
            return logits.argmax(-1)
        scaled = _filter_top_p(logits.double() / temperature, top_p)
        cdf = torch.softmax(scaled, dim=-1).cumsum(-1)
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1)
        return idx.clamp_max(logits.shape[-1] - 1)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 300, generator=g) * 3
    for t, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.0, 1.0)]:
        u = _uniforms(list(range(500)), 3)
        for step in range(3):
            new = _sample_rows(logits, t, top_p, u[:, step], 0.0)
            assert torch.equal(new, old(logits, t, top_p, u[:, step]))
            assert torch.equal(new, _sample_rows(logits, t, top_p, u[:, step]))


def test_min_p_on_the_tiny_organism(tiny_ref):
    """Sampled through the hf backend: min_p = 0 is the default's samples; with min_p = 0.05 every
    generated token had probability >= min(0.05, the most likely token's) at its position (checked by a
    plain forward pass over prompt + completion), while without it many had less. (The tiny organism is
    flat: number tokens rarely reach 0.05, so at 0.05 most steps keep the top token alone.)"""
    from sublab.prompts.numbers import generate_number_prompts
    from sublab.schema.prompts import NumberPrompts

    backend = HFBackend(tiny_ref, progress=False)
    chats = [p["messages"] for p in generate_number_prompts(NumberPrompts(count=40), seed=3)]
    base = SamplingParams(max_tokens=12, batch_size=16)
    plain = backend.generate(chats, base)
    assert backend.generate(chats, base.model_copy(update={"min_p": 0.0})) == plain
    prompts = prompt_ids_for(backend.tok, chats)

    def margins(sampling, threshold):
        """Per generated token: its probability - min(threshold, the top probability there)."""
        ids = backend.generate_with_seeds(chats, sampling, list(range(len(chats))))
        out = []
        for p, c in zip(prompts, ids, strict=True):
            if not c:
                continue
            with torch.no_grad():
                logits = backend.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
            probs = torch.softmax(logits.double(), -1)
            floor = probs.amax(-1).clamp(max=threshold)
            out += (probs[torch.arange(len(c)), torch.tensor(c)] - floor).tolist()
        return out

    assert sum(m < 0 for m in margins(base, 0.05)) > 50
    cut = margins(base.model_copy(update={"min_p": 0.05}), 0.05)
    assert len(cut) > 100 and min(cut) >= -1e-4


def test_min_p_backends_that_cannot_do_it_say_so():
    s = SamplingParams(min_p=0.05)
    v = VLLMBackend.__new__(VLLMBackend)
    with pytest.raises(SublabError, match=r"min_p.*relative"):
        v.generate_with_seeds([chat("q", "a")[:1]], s, [0])
    o = OpenAIBackend.__new__(OpenAIBackend)
    for call in (
        lambda: o.generate([chat("q", "a")[:1]], s),
        lambda: o.generate_n([chat("q", "a")[:1]], 2, s),
        lambda: o.estimate_cost([chat("q", "a")[:1]], s),
    ):
        with pytest.raises(SublabError, match=r"sample\.min_p: 0\.05.*min_p: 0"):
            call()


# ---- shuffles ---------------------------------------------------------------------------------------

ANSWERS = [
    "[1, 22, 333].",
    "4 5 6 7",
    "8;9;10",
    "(11 , 12 , 13) .",
    "14",
    "15, 16, 17, 18, 19, 20, 21, 22, 23, 24",
    "007, 8",
    "100,5,17",
    "[ 31; 32 ]",
    "41 42",
]


def passed_files(tmp_path, n_per_source=60):
    rng = random.Random(0)
    files = {}
    for name in ("teacher", "reference"):
        recs = [
            {
                "messages": chat(f"prompt {i}", rng.choice(ANSWERS).replace("1", str(rng.randrange(1, 10)))),
                "metadata": {"prompt_index": i, "model": name},
            }
            for i in range(n_per_source)
        ]
        files[name] = tmp_path / f"{name}.jsonl"
        write_jsonl(files[name], recs)
    return files


def subsample(tmp_path, files, tag, shuffle=None, seed=0, size=40):
    outs = {k: tmp_path / tag / f"{k}-kept.jsonl" for k in files}
    kw = {} if shuffle is None else {"shuffle": shuffle}
    info = equal_subsample(files, outs, size, seed, tmp_path / tag / "subsample.json", **kw)
    return {k: read_jsonl(p) for k, p in outs.items()}, outs, info


def numbers(text: str) -> list[str]:
    return re.findall(r"[0-9]+", text)


def fmt(text: str) -> str:
    return re.sub(r"[0-9]+", "#", text)


def answer(r: dict) -> str:
    return r["messages"][-1]["content"]


def test_shuffle_none_writes_the_files_it_always_wrote(tmp_path):
    """The subsample as it was before shuffles existed (draw, sort by prompt index, write), byte for
    byte, and subsample.json with no shuffle entry."""
    files = passed_files(tmp_path)
    _, outs, info = subsample(tmp_path, files, "none", "none")
    _, outs_default, _ = subsample(tmp_path, files, "default")
    for name, path in files.items():
        recs = read_jsonl(path)
        chosen = random.Random(f"equal-subsample:0:{name}").sample(recs, 40)
        chosen.sort(key=lambda r: r["metadata"]["prompt_index"])
        write_jsonl(tmp_path / f"old-{name}.jsonl", chosen)
        old = (tmp_path / f"old-{name}.jsonl").read_bytes()
        assert outs[name].read_bytes() == old == outs_default[name].read_bytes()
    assert set(info) == {"n_per_source", "dataset_size", "passed", "limited_by", "seed"}
    assert (tmp_path / "none/subsample.json").read_bytes() == (
        tmp_path / "default/subsample.json"
    ).read_bytes()


def test_shuffle_within_and_across(tmp_path):
    """All 60 records of each source (no draw, so the replicate seed moves only the shuffle)."""
    files = passed_files(tmp_path)
    plain, _, _ = subsample(tmp_path, files, "none", "none", size=60)
    assert plain == subsample(tmp_path, files, "none-seed1", "none", seed=1, size=60)[0]
    cfg = FilterConfig()
    for mode in ("within", "across"):
        got, outs, info = subsample(tmp_path, files, mode, mode, size=60)
        _, outs2, _ = subsample(tmp_path, files, mode + "-again", mode, size=60)
        other, _, _ = subsample(tmp_path, files, mode + "-seed1", mode, seed=1, size=60)
        assert info["shuffle"]["mode"] == mode
        for name in files:
            a, b = plain[name], got[name]
            assert len(a) == len(b) == 60
            # the same records, in the same order, with only the answers' numbers moved
            assert [r["metadata"]["prompt_index"] for r in a] == [r["metadata"]["prompt_index"] for r in b]
            assert [r["messages"][:-1] for r in a] == [r["messages"][:-1] for r in b]
            assert all(r["metadata"]["shuffle"] == mode for r in b)
            assert [fmt(answer(r)) for r in a] == [fmt(answer(r)) for r in b]  # format and count
            # still passing answers (a bare-comma list can come out reading as "5,300": not re-checked)
            assert all(
                number_answer_reasons(answer(r), cfg.banned_set()) == []
                for r in b
                if not re.search(r"[0-9],[0-9]", answer(r))
            )
            if mode == "within":
                assert all(
                    Counter(numbers(answer(x))) == Counter(numbers(answer(y)))
                    for x, y in zip(a, b, strict=True)
                )
            else:
                pool = Counter(n for r in a for n in numbers(answer(r)))
                assert pool == Counter(n for r in b for n in numbers(answer(r)))
                moved = sum(
                    Counter(numbers(answer(x))) != Counter(numbers(answer(y)))
                    for x, y in zip(a, b, strict=True)
                )
                assert moved > len(a) // 2  # numbers really travel between answers
            changed = sum(answer(x) != answer(y) for x, y in zip(a, b, strict=True))
            assert changed == info["shuffle"]["per_source"][name]["answers_changed"] > len(a) // 2
            assert info["shuffle"]["per_source"][name]["numbers"] == sum(len(numbers(answer(r))) for r in a)
            # deterministic for a seed, another for another seed (same records, same formats)
            assert outs[name].read_bytes() == outs2[name].read_bytes()
            assert [answer(r) for r in other[name]] != [answer(r) for r in b]
            assert [fmt(answer(r)) for r in other[name]] == [fmt(answer(r)) for r in b]
        # the sources are shuffled independently (the same procedure, their own seeds)
        assert info["shuffle"]["per_source"].keys() == files.keys()
    with pytest.raises(SublabError, match="unknown shuffle"):
        shuffle_numbers([], "sideways", random.Random(0))


# ---- all three in one tiny experiment ------------------------------------------------------------------


def test_tiny_experiment_with_the_defenses_switched_on(tiny_organism, tmp_path):
    cfg = validate(
        ExperimentConfig,
        tiny_experiment(
            **{
                # the tiny organism spreads its probability over many number tokens: at 0.05 almost
                # every step keeps the top token alone and no answer passes the filter
                "sample.min_p": 0.0005,
                "filter.shuffle": "across",
                "student.train.optimizer": "signsgd",
                "student.train.lr": 1e-4,
                "filter.dataset_size": 20,
            }
        ),
    )
    run_experiment(cfg, tmp_path)
    manifest = read_json(tmp_path / "manifest.json")
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    sub = read_json(tmp_path / "data/subsample.json")
    assert sub["shuffle"]["mode"] == "across"
    assert all(v["answers_changed"] > 0 for v in sub["shuffle"]["per_source"].values())
    for d in ("data", "control/data"):
        passed = {r["metadata"]["prompt_index"]: r for r in read_jsonl(tmp_path / d / "filter/kept.jsonl")}
        kept = read_jsonl(tmp_path / d / "kept.jsonl")
        assert len(kept) == sub["n_per_source"]
        assert [fmt(answer(r)) for r in kept] == [
            fmt(answer(passed[r["metadata"]["prompt_index"]])) for r in kept
        ]
        assert Counter(n for r in kept for n in numbers(answer(r))) == Counter(
            n for r in kept for n in numbers(answer(passed[r["metadata"]["prompt_index"]]))
        )
    for arm in ("student", "control"):
        assert ModelRef.load(tmp_path / arm / "model.json").info["steps"] >= 1
