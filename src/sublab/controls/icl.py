"""The in-context-learning control (`controls.icl_examples`): can the data transmit the trait *in context*?

For each k > 0, the reference model answers every evaluation question after k of the teacher's kept
training examples (prior user/assistant turns), and, as its control, after k of the control data's kept
examples; P(target) with teacher examples minus P(target) with control examples is the in-context effect.
The paper finds it flat while finetuning on the same data transfers the trait.

The k examples are drawn per question with the replicate seed; the same indices are drawn for the
teacher's and the control's file (both hold the same number of examples after the equal-size subsample).
A model has a context limit (the organism: 160 positions): the oldest examples are dropped until the
prompt plus the longest answer the evaluation scores (exact mode: the longest candidate form in tokens;
sample mode: eval.max_tokens) fits the model's max positions, read from its config. results.json
records, per question, how many examples were used and the prompt's length in tokens. API models
(openai/...) have no known limit here: nothing is dropped and `max_positions` is null.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from sublab.backends.base import Backend, ModelRef
from sublab.errors import SublabError
from sublab.records import read_jsonl
from sublab.schema.evaluation import PreferenceEval

ICL_VERSION = 1  # part of the ICL stages' keys: bump when results.json gains or changes fields


def example_turns(record: dict) -> list[dict]:
    """A kept training example as prior turns: its user and assistant messages (no system message)."""
    return [{"role": m["role"], "content": m["content"]} for m in record["messages"] if m["role"] != "system"]


def draw_examples(n_available: int, k: int, seed: int, question: int) -> list[int]:
    """Indices of the k examples put before question `question` (all of them when fewer are available),
    drawn with the replicate seed; the same for every data source of a run.

    >>> draw_examples(10, 3, 0, 0) == draw_examples(10, 3, 0, 0), len(draw_examples(2, 3, 0, 0))
    (True, 2)
    """
    rng = random.Random(f"icl:{seed}:{k}:{question}")
    return rng.sample(range(n_available), min(k, n_available))


def fit_context(
    examples: list[list[dict]], question: list[dict], n_tokens: Callable[[list[dict]], int], limit: int | None
) -> tuple[list[dict], int, int]:
    """The longest suffix of `examples` (each a list of turns, oldest first) whose turns before
    `question` make a prompt of at most `limit` tokens (n_tokens(chat) counts a chat's prompt, with the
    generation prompt): the oldest examples go first. -> (prefix turns, examples used, prompt tokens).
    With limit None everything is kept. When not even the bare question fits, 0 examples are used."""
    for used in range(len(examples), -1, -1):
        prefix = [t for ex in examples[len(examples) - used :] for t in ex]
        n = n_tokens(prefix + question)
        if limit is None or n <= limit or used == 0:
            return prefix, used, n
    raise AssertionError("unreachable")


def max_positions(backend: Backend) -> int | None:
    """The model's context limit from its config (max_position_embeddings, n_positions), or None."""
    config = getattr(getattr(backend, "model", None), "config", None)
    if config is None and not backend.ref.is_remote and Path(backend.ref.path).is_dir():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(backend.ref.path)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, name, None) if config is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def token_counter(backend: Backend) -> Callable[[list[dict]], int] | None:
    """Counts a chat's prompt tokens as the backend builds it (chat template, its system prompt), for
    backends with a tokenizer (hf, organism, vllm); None otherwise."""
    tok = getattr(backend, "tok", None)
    if tok is None:
        return None
    from sublab.backends.hf import with_system_prompt
    from sublab.backends.hf_generate import prompt_ids_for

    return lambda chat: len(prompt_ids_for(tok, [with_system_prompt(chat, backend.ref.system_prompt)])[0])


def answer_reserve(backend: Backend, category: str, cfg: PreferenceEval) -> int:
    """Positions to leave after the prompt: the longest scored answer form (exact) or eval.max_tokens."""
    if cfg.mode == "sample" or not hasattr(backend, "candidate_ids"):
        return cfg.max_tokens
    from sublab.evals.preference import _variants
    from sublab.evals.questions import candidates

    forms = [f for c, pl in candidates(category).items() for f in _variants(backend, c, pl)]
    return max(len(ids) for ids in backend.candidate_ids(forms))


def icl_contexts(
    backend: Backend, records: list[dict], k: int, seed: int, category: str, cfg: PreferenceEval
) -> tuple[list[list[dict]], dict]:
    """Per evaluation question, the prior turns of k drawn examples, cut to fit -> (contexts, info)."""
    from sublab.evals.preference import question_chats

    questions = question_chats(category, cfg)
    limit_model = max_positions(backend) if not backend.ref.is_remote else None
    count = token_counter(backend)
    reserve = answer_reserve(backend, category, cfg) if limit_model is not None else 0
    limit = limit_model - reserve if limit_model is not None and count is not None else None
    contexts, used, lengths = [], [], []
    for qi, q in enumerate(questions):
        exs = [example_turns(records[i]) for i in draw_examples(len(records), k, seed, qi)]
        if count is None:
            prefix, u, n = [t for ex in exs for t in ex], len(exs), None
        else:
            prefix, u, n = fit_context(exs, q, count, limit)
        contexts.append(prefix)
        used.append(u)
        lengths.append(n)
    info = {
        "k": k,
        "max_positions": limit_model,
        "reserved_for_answer": reserve,
        "examples_used_per_question": used,
        "mean_examples_used": sum(used) / len(used) if used else 0.0,
        "prompt_tokens_per_question": lengths,
        "truncated_questions": sum(u < min(k, len(records)) for u in used),
    }
    return contexts, info


def evaluate_icl(
    model_json: Path,
    kept_jsonl: Path,
    k: int,
    seed: int,
    source: str,
    category: str,
    targets: list[str],
    cfg: PreferenceEval,
    out_dir: Path,
    progress: bool = True,
    api=None,
) -> dict:
    """The model's preference with k examples of `kept_jsonl` in context -> out_dir/results.json (the
    preference results plus `icl`: k, source, examples used per question) and samples.jsonl."""
    from sublab.backends.registry import load_backend
    from sublab.evals.preference import evaluate_preference
    from sublab.stages.evaluate import save_preference

    if k < 1:
        raise SublabError(f"ICL control: k must be >= 1 (k = 0 is the model's own evaluation), got {k}")
    records = read_jsonl(kept_jsonl, require_messages=True)
    if not records:
        raise SublabError(f"{kept_jsonl}: no examples for the in-context control")
    ref = ModelRef.load(model_json)
    backend = load_backend(ref, progress, api=api)
    contexts, info = icl_contexts(backend, records, k, seed, category, cfg)
    results, rows = evaluate_preference(backend, category, targets, cfg, context=contexts)
    results["icl"] = {"source": source, "data": str(kept_jsonl.name), "version": ICL_VERSION, **info}
    for row, qi in zip(rows, _question_index(rows), strict=True):
        row["icl_examples_used"] = info["examples_used_per_question"][qi]
    return save_preference(ref, results, rows, out_dir)


def _question_index(rows: list[dict]) -> list[int]:
    """Each sample row's question number (rows come grouped by question, in order)."""
    out, last, qi = [], None, -1
    for r in rows:
        if r["question"] != last:
            qi, last = qi + 1, r["question"]
        out.append(qi)
    return out
