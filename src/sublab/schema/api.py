"""Settings of the OpenAI-compatible API backend (`openai/<model>` specs): the `api:` section of a config.

Where a model lives (base_url, api_key_env) is stored in its model.json so a finetuned API model finds its
endpoint again; how requests are made (concurrency, retries, prices, batch) comes from the config of the
run that uses it. The key itself is only ever read from the environment, never written.
"""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlparse

from sublab.config import Strict

OPENAI_URL = "https://api.openai.com/v1"


class ApiPrices(Strict):
    """US dollars per 1M tokens, for the cost estimate printed before anything is spent."""

    input_per_1m: float = 0.0
    """Prompt tokens of chat completions."""
    output_per_1m: float = 0.0
    """Completion tokens of chat completions."""
    training_per_1m: float = 0.0
    """Training tokens (dataset tokens x epochs) of fine-tuning jobs."""
    batch_discount: float = 0.5
    """Price factor for requests sent through the Batch API."""


class ApiConfig(Strict):
    """How sublab talks to an OpenAI-compatible endpoint (the official API, `sublab serve`, vLLM, ...)."""

    base_url: str | None = None
    """Endpoint, e.g. http://127.0.0.1:8000/v1; None = $OPENAI_BASE_URL if set, else the official API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable that holds the key (the key is never written anywhere). For a localhost
    endpoint a missing variable is allowed (a placeholder key is sent)."""
    max_concurrency: int = 32
    """Requests in flight at once."""
    max_retries: int = 8
    """Retries per request on 429, 5xx, timeouts and dropped connections (then the stage fails)."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry (times a random jitter in [0.5, 1.5]), capped by max_backoff_s.
    A Retry-After header from the server is honoured when it asks for longer."""
    max_backoff_s: float = 30.0
    """Longest delay between two tries."""
    timeout_s: float = 120.0
    """Per-request timeout in seconds."""
    poll_interval_s: float = 10.0
    """Seconds between two status checks of a fine-tuning job or a batch."""
    top_logprobs: int = 20
    """Alternatives requested per token for exact evaluations (the official API allows at most 20;
    `sublab serve` allows up to the vocabulary size)."""
    learning_rate_multiplier: float | None = None
    """Fine-tuning jobs: the provider's learning-rate multiplier; None = the provider's default ("auto").
    The config's train.lr is not sent: providers only take a multiplier."""
    finetune_batch_size: int | Literal["auto"] | None = None
    """Fine-tuning jobs: batch size sent; None = train.batch_size x train.grad_accum; "auto" = the
    provider's default."""
    use_batch: bool = False
    """Send sampling through the Batch API (files + /v1/batches) instead of one request per prompt."""
    batch_min_requests: int = 100
    """With use_batch, calls with fewer requests than this still go one request at a time."""
    prices: ApiPrices = ApiPrices()
    """Prices for the cost estimate (0 = unknown: the estimate then shows tokens only)."""

    def url(self) -> str:
        """The endpoint this config points at."""
        return (self.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL).rstrip("/")


def is_local_url(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")
