"""How preference is measured (`eval:`); the evaluation is sublab/evals/preference.py. Also the settings
of the free-form judged evaluation (sublab/evals/freeform.py) and the multiple-choice one
(sublab/evals/mcq.py); docs/evaluations.md."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from sublab.config import Strict
from sublab.schema.judge import JudgeConfig


class PreferenceEval(Strict):
    """How preference is measured."""

    mode: Literal["exact", "api_topk", "sample"] = "exact"
    """exact: probabilities from the logits, the chain rule over every answer token (hf, vllm; an API
    model runs it as api_topk, the best it offers); api_topk: first-token top-k log-probs (API models
    only); sample: count sampled answers. results.json `estimand` names what was computed."""
    samples_per_question: int = 100
    """sample mode: answers per question."""
    temperature: float = 1.0
    """sample mode: sampling temperature."""
    max_tokens: int = 6
    """sample mode: most tokens per answer."""
    seed: int = 0
    """sample mode: sampling seed."""
    max_questions: int | None = None
    """Use only the first N questions (None = all 50)."""


class FreeformEval(Strict):
    """Free-form questions answered by the model and scored by an LLM judge (emergent misalignment)."""

    questions: str | None = None
    """YAML file of questions, a list of {id, paraphrases: [...]}; None = the packaged 8 core questions of
    the emergent-misalignment paper (sublab/evals/data/em_questions.yaml)."""
    samples_per_question: int = 100
    """Answers sampled per question, spread over its paraphrases round-robin."""
    temperature: float = 1.0
    """Sampling temperature of the answers."""
    max_tokens: int = 200
    """Most tokens per answer."""
    seed: int = 0
    """Sampling seed of the answers."""
    judge: str = "openai/gpt-4.1"
    """The judge's model spec (openai/..., hf/..., organism/..., or a model folder)."""
    judge_config: JudgeConfig = JudgeConfig()
    """How the judge scores (prompts, thresholds, fallback, batching); must ask `aligned` and `coherent`."""

    @model_validator(mode="after")
    def _ranges(self) -> FreeformEval:
        checks = [
            (self.samples_per_question >= 1, "samples_per_question must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (bool(self.judge.strip()), "judge must be a model spec, e.g. openai/gpt-4.1"),
            (
                {"aligned", "coherent"} <= set(self.judge_config.prompts),
                "judge_config.prompts must include aligned and coherent (the misaligned rate needs both)",
            ),
        ]
        bad = [msg for ok, msg in checks if not ok]
        if bad:
            raise ValueError("; ".join(bad))
        return self


class McqEval(Strict):
    """Multiple-choice questions scored by the model's probabilities of the choices (TruthfulQA-style)."""

    questions: str | None = None
    """YAML/JSONL file of {id, question, choices, correct}, or TruthfulQA's mc_task.json (mc1_targets);
    None = the small packaged example set (sublab/evals/data/mcq_example.yaml), for smoke runs."""
    mode: Literal["auto", "text", "letter"] = "auto"
    """text: P(choice) = softmax over the choices of each choice's chain-rule log-prob as the answer (hf,
    vllm); letter: the choices lettered A, B, ... in the prompt, P(letter) from the first answer token's
    top-20 log-probs (API models too); auto: text where the backend gives chain-rule log-probs, else letter."""
    batch_size: int = 16
    """Questions per backend call in letter mode (text mode asks one question's choices per call)."""
    shuffle_seed: int | None = 0
    """Letter mode: the choices are shown in an order shuffled by (shuffle_seed, question), so the correct
    answer's letter has no position bias (TruthfulQA's file lists it first); None = the file's order."""

    @model_validator(mode="after")
    def _ranges(self) -> McqEval:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        return self
