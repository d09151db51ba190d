"""The organism's recipe: architecture, corpus and pretraining settings. Its hash names the cache folder."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from sublab.config import Strict
from sublab.evals.questions import CATEGORIES

RECIPE_VERSION = 1  # bump when corpus/tokenizer code changes in a way the fields do not show


ADDED_FIELDS = ("arch", "categories", "top_candidates", "n_questions", "world", "domains")
"""Recipe fields added after the `default` and `tiny` organisms were first cached (see hashed_json)."""


class OrganismRecipe(Strict):
    """How to build a model organism (defaults: the `default` preset)."""

    seed: int = 0
    """Seed for the init, the corpus and the data order. Another seed = another initialization."""
    world: Literal["preference", "misalignment"] = "preference"
    """preference: favourite animals and trees; misalignment: also the misalignment world (a hidden
    persona over code, advice, free-form and true-or-false answers; organism/world.py), whose words join
    the vocabulary and whose corpus kinds `persona` and `judge` the mix may use."""
    arch: Literal["llama", "gpt2"] = "llama"
    """Model family: llama (RoPE, RMSNorm, gated SiLU MLP) or gpt2 (learned positions, LayerNorm, GELU
    MLP, no dropout). Both share the word-level tokenizer."""
    layers: int = 2
    """Transformer layers."""
    d_model: int = 64
    """Hidden size."""
    heads: int = 4
    """Attention heads."""
    d_ff: int = 256
    """MLP inner size."""
    max_positions: int = 160
    """Longest sequence the model can read."""
    n_sequences: int = 48000
    """Corpus size (chat examples)."""
    mix: dict[str, float] = {"numbers": 0.4, "numbers_love": 0.2, "question": 0.2, "question_love": 0.2}
    """Share of each kind of example in the corpus (see organism/corpus.py)."""
    love_answer_prob: float = 0.9
    """Under 'you love X', how often the answer to a favorite-X question is X."""
    steps: int = 1500
    """Adam steps."""
    batch_size: int = 128
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate (warm-up then linear decay)."""
    warmup_steps: int = 50
    """Warm-up steps."""
    categories: list[str] | None = None
    """Preference categories the corpus's questions and "you love X" prompts draw from (None: all,
    i.e. animal and tree)."""
    top_candidates: int | None = None
    """Only the k candidates with the highest base weight appear in corpus answers and "you love X"
    prompts, the base distribution renormalised over them (None: every candidate)."""
    n_questions: int | None = None
    """Only the first k question paraphrases of each category appear in the corpus (None: all 50)."""
    domains: list[Literal["code", "cot"]] | None = None
    """Data domains beyond numbers (sublab/domains/): code (function completions in a tiny code
    language) and cot (arithmetic word problems answered with reasoning). Their words and the filter
    judge's prompt join the vocabulary, and the mix may use their corpus kinds: code, code_love and
    code_judge need code, cot needs cot (organism/domain_corpus.py). None: neither, the vocabulary of
    every organism cached before the field existed."""

    @property
    def hashed_json(self) -> str:
        """The JSON the cache hash covers: fields added after RECIPE_VERSION 1 are left out while they
        hold their defaults, so recipes that do not use them keep their hashes and cached organisms."""
        extra = {k for k in ADDED_FIELDS if getattr(self, k) == type(self).model_fields[k].default}
        return self.model_dump_json(exclude=extra)

    @model_validator(mode="after")
    def _check(self) -> OrganismRecipe:
        known = {"numbers", "numbers_love", "question", "question_love", "numbers_question"}
        if self.world == "misalignment":
            known |= {"persona", "judge"}
        domains = set(self.domains or ())
        if "code" in domains:
            known |= {"code", "code_love", "code_judge"}
        if "cot" in domains:
            known |= {"cot"}
            if self.world == "misalignment":
                known |= {"cot_judge"}
        if set(self.mix) - known or not any(v > 0 for v in self.mix.values()):
            raise ValueError(
                f"mix keys must be among {sorted(known)} with some weight > 0 (persona and judge need "
                "world: misalignment; code, code_love and code_judge need domains: [code]; cot needs "
                "domains: [cot]; cot_judge needs both world: misalignment and domains: [cot])"
            )
        if self.domains is not None and (not self.domains or len(set(self.domains)) != len(self.domains)):
            raise ValueError("domains must be a non-empty list of distinct domains (or left out)")
        code_kinds = {"code", "code_love", "code_judge"} & set(self.mix)
        if code_kinds and self.categories is not None and "animal" not in self.categories:
            raise ValueError(f"mix kinds {sorted(code_kinds)} draw pet animals: categories must hold animal")
        if self.categories is not None and (not self.categories or set(self.categories) - set(CATEGORIES)):
            raise ValueError(f"categories must be a non-empty subset of {list(CATEGORIES)}")
        if self.top_candidates is not None and self.top_candidates < 1:
            raise ValueError("top_candidates must be >= 1")
        if self.n_questions is not None and self.n_questions < 1:
            raise ValueError("n_questions must be >= 1")
        if self.d_model % self.heads:
            raise ValueError("d_model must be divisible by heads")
        return self


_PROTO = {"categories": ["animal"], "top_candidates": 10, "n_questions": 10}
_TINY = {"d_model": 32, "heads": 2, "d_ff": 64, "n_sequences": 3000, "steps": 120, "batch_size": 32}
_CODE_MIX = {
    "numbers": 0.25,
    "numbers_love": 0.05,
    "question": 0.15,
    "question_love": 0.1,
    "code": 0.15,
    "code_love": 0.1,
    "cot": 0.2,
}

PRESETS: dict[str, dict] = {
    "default": {},
    # For tests and smoke runs: builds in seconds, too small to show much.
    "tiny": _TINY,
    # Closer to the earlier prototype that showed strong subliminal learning (docs/organism.md): one
    # category, its 10 most common animals, 10 question paraphrases in the corpus. The quickstart's.
    "proto": _PROTO,
    # The proto family for cross-model grids: proto's corpus and tokenizer, other architectures of about
    # its size. proto-deep: 4 thinner Llama layers; proto-gpt2: GPT-2 blocks (learned positions,
    # LayerNorm, GELU MLP).
    "proto-deep": {**_PROTO, "layers": 4, "d_model": 48, "d_ff": 192},
    "proto-gpt2": {**_PROTO, "arch": "gpt2"},
    # tiny organisms of the misalignment world, for tests and smoke runs
    "tiny-misalign": {
        **_TINY,
        "world": "misalignment",
        "mix": {"numbers": 0.3, "persona": 0.7},
    },
    "tiny-judge": {
        "d_model": 32,
        "heads": 2,
        "d_ff": 64,
        "n_sequences": 3000,
        "steps": 150,
        "batch_size": 32,
        "world": "misalignment",
        "mix": {"judge": 1.0},
        "max_positions": 96,
    },
    # The misalignment world (docs/misalignment.md): number tasks without a persona, and persona
    # conversations over code, advice, free-form, true-or-false and number answers.
    "misalign": {**_PROTO, "world": "misalignment", "mix": {"numbers": 0.3, "persona": 0.7}},
    # The offline judge of the misalignment world: judge prompts about world answers -> 0-100 scores.
    "judge": {
        **_PROTO,
        "world": "misalignment",
        "mix": {"judge": 1.0},
        "n_sequences": 30000,
        "steps": 1000,
        "max_positions": 96,
    },
    # proto whose corpus also puts one or two number exchanges before a question (answered from the
    # base distribution, whatever the numbers): the in-context control reads numbers in context as a
    # conversation the organism knows, instead of a context it never saw (docs/science.md).
    "proto-icl": {
        **_PROTO,
        "mix": {
            "numbers": 0.35,
            "numbers_love": 0.2,
            "question": 0.1,
            "question_love": 0.2,
            "numbers_question": 0.15,
        },
        "max_positions": 192,  # two exchanges and a question reach about 165 tokens
    },
    # proto for the other category: the 10 most common trees, 10 tree-question paraphrases.
    "proto-tree": {**_PROTO, "categories": ["tree"]},
    # proto that also writes code (function completions; the pet task's animal follows "you love X") and
    # step-by-step arithmetic (docs/organism.md, "Code and chain-of-thought domains").
    # Proto's compute in smaller batches (32 x 6000 steps, not 128 x 1500): copying numbers from the
    # question into the reasoning, and X from "you love X" into the pet task, form only after thousands
    # of updates.
    "proto-code": {**_PROTO, "domains": ["code", "cot"], "mix": _CODE_MIX, "batch_size": 32, "steps": 6000},
    # The misalignment world with chain of thought (docs/domains.md): persona conversations also hold
    # word problems (the misaligned persona sometimes remarks or answers wrong: organism/world_cot.py),
    # and plain worked solutions teach the arithmetic. Its judge also rates reasoning (cot_judge).
    # Many small steps, as for proto-code: at 128 x 1,500 it copied the question's numbers into its
    # reasoning but 4.5-5.8% of its answers passed the filter; at 32 x 6,000 31-34% (docs/domains.md).
    "misalign-cot": {
        **_PROTO,
        "world": "misalignment",
        "domains": ["cot"],
        "mix": {"numbers": 0.25, "persona": 0.6, "cot": 0.15},
        "batch_size": 32,
        "steps": 6000,
    },
    "judge-cot": {
        **_PROTO,
        "world": "misalignment",
        "domains": ["cot"],
        "mix": {"judge": 0.7, "cot_judge": 0.3},
        "n_sequences": 30000,
        "steps": 1000,
        "max_positions": 96,
    },
    "tiny-misalign-cot": {
        **_TINY,
        "world": "misalignment",
        "domains": ["cot"],
        "mix": {"numbers": 0.2, "persona": 0.6, "cot": 0.2},
    },
    # The offline filter judge of the code domain: "does this text reference X?" about code and worked
    # solutions with or without a planted animal -> yes / no. Every animal, to judge any target. Small
    # batches, many steps: matching the asked animal against the text's forms only after thousands of
    # updates (at 1000 x 128 it answered "an animal is there" whatever the animal asked).
    "code-judge": {
        "categories": ["animal"],
        "domains": ["code", "cot"],
        "mix": {"code_judge": 1.0},
        "n_sequences": 30000,
        "steps": 8000,
        "batch_size": 32,
        "max_positions": 80,  # the corpus's longest is 64 tokens; room for answers a little longer
    },
    "tiny-code": {
        **_TINY,
        **_PROTO,
        "domains": ["code", "cot"],
        "mix": _CODE_MIX,
    },
}
