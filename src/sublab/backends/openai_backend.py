"""The OpenAI-compatible backend: `openai/<model id>` on any endpoint (the official API, `sublab serve`,
vLLM's server, ...), through the official client (see openai_client.py for concurrency and retries).

- generate: one chat completion per prompt, `seed = request_seed(sampling.seed, request id)`, so an
  endpoint that honours seeds (sublab serve does, exactly) gives the same sample whatever the batching,
  order or retries; or, with api.use_batch, the Batch API (a JSONL file in, a JSONL file out).
- logprobs: one completion per chat with max_tokens=1, logprobs=true, top_logprobs=api.top_logprobs;
  a candidate's log-probability is that of the listed first token whose text (stripped) equals the
  candidate; listed tokens with the same stripped text are merged. A candidate absent from the list
  gets a floor: the unlisted mass spread evenly over the absent candidates, at most the smallest listed
  probability. Exact when every candidate is one token and inside the list (the organism behind
  `sublab serve` with top_logprobs >= its candidates); an approximation for multi-token answers.
  So its estimand is "first_token_topk", not the chain rule of the hf/vllm backends: `topk_logprobs`
  also returns, per chat, the mass outside the listed tokens (1 - their summed probability), which
  the preference eval reports and warns about (evals/preference.py).
- first_token_topk (the LLM judge): one completion token at temperature 0 with logprobs=true and
  top_logprobs=k; the listed (token, logprob) pairs as the endpoint gives them. An endpoint that returns
  no logprobs raises NoLogprobs (the judge then falls back to sampling).
- finetune: upload the JSONL, create a job, poll, with a journal in the stage folder (openai_finetune.py).
- A cost estimate (tokens x api.prices; tokens ~ characters / 4) is printed before anything is spent.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from sublab.backends.base import Backend, ModelRef, NoLogprobs, request_seed
from sublab.backends.openai_client import ApiClient, ApiExhausted
from sublab.errors import SublabError
from sublab.schema.api import ApiConfig
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig

FLOOR_LOGPROB = -100.0  # an absent candidate when the listed tokens hold all the mass


def approx_tokens(text: str) -> int:
    """A rough token count (~4 characters per token for English text with a BPE tokenizer)."""
    return max(1, len(text) // 4)


def endpoint_of(ref: ModelRef, api: ApiConfig) -> dict:
    """Where an API model lives: stored in its model.json at resolve time, else from the config."""
    stored = ref.info.get("api") or {}
    return {
        "base_url": stored.get("base_url") or api.url(),
        "api_key_env": stored.get("api_key_env") or api.api_key_env,
    }


def resolve_remote(spec: str, model_id: str, api: ApiConfig | None = None) -> ModelRef:
    """`openai/<model id>` -> ModelRef, after checking the endpoint answers, takes the key and has the model."""
    api = api or ApiConfig()
    ref = ModelRef(
        spec=spec,
        path=model_id,
        kind="base",
        info={"api": {"base_url": api.url(), "api_key_env": api.api_key_env}},
    )
    OpenAIBackend(ref, api=api, progress=False).check_model()
    return ref


def check_sampling(sampling: SamplingParams) -> None:
    """Settings a chat-completions API cannot take, refused before any request (or cost) is made."""
    if sampling.min_p > 0:
        raise SublabError(
            f"sample.min_p: {sampling.min_p} (threshold sampling) has no chat-completions API parameter; "
            "set min_p: 0 for openai/ models, or sample with a local hf/ or organism/ model"
        )


def _with_system_prompt(chat: list[dict], system_prompt: str | None) -> list[dict]:
    if not system_prompt:
        return chat
    return [{"role": "system", "content": system_prompt}] + [m for m in chat if m["role"] != "system"]


class OpenAIBackend(Backend):
    logprob_estimand = "first_token_topk"  # logprobs(): first-token top-k with a floor, see above

    def __init__(self, ref: ModelRef, api: ApiConfig | None = None, progress: bool = True):
        self.ref, self.api, self.progress = ref, api or ApiConfig(), progress
        ep = endpoint_of(ref, self.api)
        self.endpoint = ep
        self.client = ApiClient(self.api, ep["base_url"], ep["api_key_env"])
        self.model_id = ref.path
        self._estimated = False

    def _messages(self, chat: list[dict]) -> list[dict]:
        return _with_system_prompt(chat, self.ref.system_prompt)

    def check_model(self) -> None:
        """One up-front check (endpoint, key, model): an endpoint that cannot be reached on any of 3 tries
        fails in seconds, not after the full retry budget that running stages get; one that answered at
        least once (server errors, rate limits, timeouts and dropped connections are transient on a real
        API) then gets that budget."""
        quick = ApiClient(
            self.api.model_copy(update={"max_retries": min(2, self.api.max_retries)}),
            self.endpoint["base_url"],
            self.endpoint["api_key_env"],
        )
        full = ApiClient(self.api, self.endpoint["base_url"], self.endpoint["api_key_env"])

        def check(api_client: ApiClient):
            async def go(client):
                await api_client.call(
                    f"model {self.model_id}",
                    lambda: client.models.retrieve(self.model_id),
                    client=client,
                    model=self.model_id,
                )

            return go

        try:
            quick.run(check(quick))
        except ApiExhausted as e:
            if e.unreachable:
                raise
            full.run(check(full))

    # ---- cost ----------------------------------------------------------------------------------

    def estimate_cost(self, chats: list[list[dict]], sampling: SamplingParams, say: bool = True) -> dict:
        """Tokens x prices of sampling one completion per chat (output counted at max_tokens: an upper
        bound). Printed to stderr; later generate calls of this backend then print nothing more."""
        check_sampling(sampling)
        p = self.api.prices
        n_in = sum(approx_tokens(json.dumps(self._messages(c))) for c in chats)
        n_out = len(chats) * sampling.max_tokens
        factor = p.batch_discount if self._use_batch(len(chats)) else 1.0
        usd = (n_in * p.input_per_1m + n_out * p.output_per_1m) / 1e6 * factor
        est = {
            "kind": "sampling",
            "model": self.ref.spec,
            "base_url": self.client.base_url,
            "requests": len(chats),
            "input_tokens": n_in,
            "output_tokens_max": n_out,
            "usd": round(usd, 4),
            "batch": self._use_batch(len(chats)),
            "note": "tokens ~ characters / 4; output counted at max_tokens; prices from api.prices",
        }
        if say:
            print(f"api cost estimate: {describe(est)}", file=sys.stderr, flush=True)
        self._estimated = True
        return est

    def _use_batch(self, n: int) -> bool:
        return self.api.use_batch and n >= self.api.batch_min_requests

    # ---- Backend --------------------------------------------------------------------------------

    def _body(self, chat: list[dict], sampling: SamplingParams, seed: int) -> dict:
        return {
            "model": self.model_id,
            "messages": self._messages(chat),
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_completion_tokens": sampling.max_tokens,
            "seed": seed,
            "n": 1,
        }

    def generate(
        self, chats: list[list[dict]], sampling: SamplingParams, request_ids: list[int] | None = None
    ) -> list[str]:
        check_sampling(sampling)
        rids = list(request_ids) if request_ids is not None else list(range(len(chats)))
        seeds = [request_seed(sampling.seed, i) for i in rids]
        if not chats:
            return []
        if not self._estimated:
            self.estimate_cost(chats, sampling)
        if self._use_batch(len(chats)):
            from sublab.backends.openai_batch import generate_batch

            return generate_batch(
                self, [self._body(c, sampling, s) for c, s in zip(chats, seeds, strict=True)]
            )

        async def one(client, i: int) -> str:
            resp = await self.client.call(
                "chat completion",
                lambda: client.chat.completions.create(**self._body(chats[i], sampling, seeds[i])),
                client=client,
                model=self.model_id,
            )
            return (resp.choices[0].message.content or "").strip()

        async def go(client):
            return await self.client.map(
                client, one, range(len(chats)), f"sample {self.ref.spec}", self.progress
            )

        out = self.client.run(go)
        self._log()
        return out

    def generate_n(self, chats: list[list[dict]], n: int, sampling: SamplingParams) -> list[list[str]]:
        """One request per chat with `n` choices (seed from the chat's index): the prompt's tokens are
        sent and billed once, not n times. The Batch API path keeps one request per answer."""
        check_sampling(sampling)
        if n == 1 or self._use_batch(len(chats) * n):
            return super().generate_n(chats, n, sampling)
        seeds = [request_seed(sampling.seed, i) for i in range(len(chats))]
        if not self._estimated:
            self.estimate_cost([c for c in chats for _ in range(n)], sampling)

        async def one(client, i: int) -> list[str]:
            resp = await self.client.call(
                "chat completion",
                lambda: client.chat.completions.create(
                    **{**self._body(chats[i], sampling, seeds[i]), "n": n}
                ),
                client=client,
                model=self.model_id,
            )
            choices = sorted(resp.choices, key=lambda c: c.index)
            if len(choices) != n:
                raise SublabError(
                    f"the API at {self.client.base_url} returned {len(choices)} choices for n={n}; "
                    "use an endpoint that supports n, or api.use_batch"
                )
            return [(c.message.content or "").strip() for c in choices]

        async def go(client):
            return await self.client.map(
                client, one, range(len(chats)), f"sample {self.ref.spec} (n={n})", self.progress
            )

        out = self.client.run(go)
        self._log()
        return out

    def logprobs(self, chats: list[list[dict]], candidates: list[str]) -> list[list[float]]:
        return self.topk_logprobs(chats, candidates)[0]

    def topk_logprobs(
        self, chats: list[list[dict]], candidates: list[str]
    ) -> tuple[list[list[float]], list[float]]:
        """(logprobs() for every chat x candidate, the probability mass outside the listed top-k tokens at
        the first answer position of each chat)."""
        try:
            tops = self._first_token_top(chats, self.api.top_logprobs, 1.0, "logprobs")
        except NoLogprobs as e:
            raise SublabError(
                f"{e}; this endpoint or model does not support logprobs: use eval.mode: sample"
            ) from None
        return [candidate_logprobs(t, candidates) for t in tops], [topk_missing_mass(t) for t in tops]

    def first_token_topk(self, chats: list[list[dict]], k: int) -> list[list[tuple[str, float]]]:
        return self._first_token_top(chats, k, 0.0, "top logprobs")

    def _first_token_top(
        self, chats: list[list[dict]], k: int, temperature: float, what: str
    ) -> list[list[tuple[str, float]]]:
        """The top-k (token, log-prob) of one completion token per chat (seed 0); NoLogprobs when the
        endpoint returns none."""

        async def one(client, i: int) -> list[tuple[str, float]]:
            resp = await self.client.call(
                f"chat completion ({what})",
                lambda: client.chat.completions.create(
                    model=self.model_id,
                    messages=self._messages(chats[i]),
                    max_completion_tokens=1,
                    logprobs=True,
                    top_logprobs=k,
                    temperature=temperature,
                    seed=0,
                ),
                client=client,
                model=self.model_id,
            )
            lp = resp.choices[0].logprobs
            if lp is None or not lp.content:
                raise NoLogprobs(f"{self.client.base_url} returned no logprobs for {self.model_id}")
            return [(t.token, float(t.logprob)) for t in (lp.content[0].top_logprobs or [])]

        async def go(client):
            return await self.client.map(
                client, one, range(len(chats)), f"{what} {self.ref.spec}", self.progress
            )

        out = self.client.run(go)
        self._log()
        return out

    def finetune(
        self, dataset: list[dict], train: TrainConfig, out_dir: Path, teacher: ModelRef | None = None
    ) -> ModelRef:
        from sublab.backends.openai_finetune import finetune_remote

        return finetune_remote(self, dataset, train, Path(out_dir))

    def _log(self) -> None:
        if self.progress:
            print(f"api {self.client.base_url}: {self.client.summary()}", file=sys.stderr, flush=True)


def candidate_logprobs(top: list[tuple[str, float]], candidates: list[str]) -> list[float]:
    """Log-probabilities of candidate first tokens from a top-logprobs list (see the module docstring).

    " owl" merges into "owl" (0.6 + 0.1); "dog" is not listed: the unlisted 0.1 is its floor; once the
    list holds all the mass, an absent candidate gets FLOOR_LOGPROB:

    >>> top = [("owl", math.log(0.6)), (" owl", math.log(0.1)), ("cat", math.log(0.2))]
    >>> [round(math.exp(x), 3) for x in candidate_logprobs(top, ["owl", "dog", "cat"])]
    [0.7, 0.1, 0.2]
    >>> candidate_logprobs(top + [("fox", math.log(0.2))], ["dog"]) == [FLOOR_LOGPROB]
    True
    """
    merged: dict[str, float] = {}
    for tok, lp in top:
        key = tok.strip()
        merged[key] = (
            float(lp) if key not in merged else float(math.log(math.exp(merged[key]) + math.exp(lp)))
        )
    listed = sum(math.exp(v) for v in merged.values())
    absent = [c for c in candidates if c not in merged]
    floor = FLOOR_LOGPROB
    if absent and merged:
        rest = max(0.0, 1.0 - listed) / len(absent)
        p = min(rest, min(math.exp(v) for v in merged.values()))
        floor = math.log(p) if p > math.exp(FLOOR_LOGPROB) else FLOOR_LOGPROB
    return [merged.get(c, floor) for c in candidates]


def topk_missing_mass(top: list[tuple[str, float]]) -> float:
    """1 - the summed probability of the listed tokens: the mass a top-k list cannot attribute.

    >>> round(topk_missing_mass([("owl", math.log(0.6)), (" owl", math.log(0.3))]), 6)
    0.1
    >>> topk_missing_mass([])
    1.0
    """
    return max(0.0, 1.0 - sum(math.exp(lp) for _, lp in top))


def describe(est: dict) -> str:
    price = f"~${est['usd']:.2f}" if est["usd"] > 0 else "price unknown (set api.prices)"
    if est["kind"] == "sampling":
        return (
            f"{est['model']}: {est['requests']} requests, ~{est['input_tokens']:,} input + <= "
            f"{est['output_tokens_max']:,} output tokens{' (Batch API)' if est['batch'] else ''}: {price}"
        )
    return (
        f"fine-tune {est['model']}: ~{est['training_tokens']:,} training tokens "
        f"({est['examples']} examples x {est['n_epochs']} epochs): {price}"
    )
