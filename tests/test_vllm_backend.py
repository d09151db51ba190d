"""The vllm backend. Without vLLM: the spec, the registry and the install error. With vLLM (marker
`vllm`, run by scripts/vllm_venv.sh in .venv-vllm): seeded sampling, LoRA adapters via LoRARequest and
exact log-probs against the hf backend, on a tiny Llama built in-process."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.organism.pretrain import make_model
from sublab.organism.recipe import OrganismRecipe
from sublab.organism.tokenizer import build_tokenizer
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import LoraSettings, TrainConfig

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
skip_without_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (scripts/vllm_venv.sh)")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    tok = build_tokenizer()
    # head_dim 64: a size every vLLM attention backend supports
    r = OrganismRecipe(seed=0, d_model=128, heads=2, d_ff=256, layers=2)
    folder = tmp_path_factory.mktemp("tiny-vllm")
    make_model(r, len(tok), tok.pad_token_id, tok.eos_token_id).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Here are some numbers: {i}, {i + 1}."}] for i in range(n)]


def test_vllm_spec_resolves_like_hf_and_routes_to_vllm(tiny_folder):
    from sublab.backends import registry

    ref = registry.resolve(f"vllm/{tiny_folder}")
    assert ref.spec.startswith("vllm/") and ref.path == str(tiny_folder.resolve())
    if not HAVE_VLLM:
        with pytest.raises(SublabError, match=r"sublab\[vllm\]"):
            registry.load_backend(ref, progress=False)


def test_trained_model_keeps_the_vllm_spec():
    from sublab.backends.vllm_backend import with_vllm_spec

    ref = with_vllm_spec(ModelRef(spec="hf/runs/x/student", path="/m", adapter="/a", kind="lora"))
    assert ref.spec == "vllm/runs/x/student" and ref.info["engine"] == "vllm"


@pytest.mark.vllm
@skip_without_vllm
def test_vllm_samples_with_per_request_seeds(tiny_folder):
    from sublab.backends.vllm_backend import VLLMBackend

    b = VLLMBackend(ModelRef(spec=f"vllm/{tiny_folder}", path=str(tiny_folder)), progress=False)
    assert b.ref.info["vllm"]
    sp = SamplingParams(max_tokens=8, seed=1)
    a = b.generate(chats(6), sp)
    assert a == b.generate(chats(6), sp)
    assert b.generate(chats(6)[3:4], sp, request_ids=[3]) == a[3:4]
    assert a != b.generate(chats(6), sp.model_copy(update={"seed": 2}))


@pytest.mark.vllm
@skip_without_vllm
def test_vllm_logprobs_match_hf_and_lora_adapter_is_served(tiny_folder, tmp_path):
    from sublab.backends.hf import HFBackend
    from sublab.backends.vllm_backend import VLLMBackend

    base = ModelRef(spec=f"vllm/{tiny_folder}", path=str(tiny_folder))
    vb = VLLMBackend(base, progress=False)
    cands = ["owl", "7", "1, 2"]
    lv = torch.tensor(vb.logprobs(chats(3), cands))
    lh = torch.tensor(HFBackend(base, progress=False).logprobs(chats(3), cands))
    assert torch.allclose(lv, lh, atol=2e-2)
    data = [{"messages": [*c, {"role": "assistant", "content": "owl"}]} for c in chats(16)]
    train = TrainConfig(lr=3e-2, max_steps=20, batch_size=8, lora=LoraSettings(r=8, alpha=16))
    student = vb.finetune(data, train, tmp_path / "student")
    assert student.spec.startswith("vllm/") and student.kind == "lora"
    sv = VLLMBackend(student, progress=False)
    assert sv.lora is not None
    after = torch.tensor(sv.logprobs(chats(3), cands))
    assert (after[:, 0] > lv[:, 0] + 1).all()  # the adapter is applied: "owl" became much likelier


def test_vllm_spec_on_a_run_folder_samples_the_trained_model_with_vllm(tmp_path, tiny_folder):
    from sublab.backends.registry import resolve

    ModelRef(spec="hf/runs/x/student", path=str(tiny_folder), kind="full").save(tmp_path / "model.json")
    assert resolve(f"hf/{tmp_path}").spec == "hf/runs/x/student"
    assert resolve(f"vllm/{tmp_path}").spec == "vllm/runs/x/student"
