"""First-step coverage screen (`controls.coverage_examples`): does the student's first update point
along the teacher's displacement from the shared init?

With theta_0 the reference (the student's init) and theta_T the teacher, d = theta_T - theta_0. The
student's first update on data D is, to first order, -lr g for SGD and -lr sign(g) for Adam (Adam's
first step divides the gradient by its own magnitude), where g is the gradient of the SFT loss (mean per
completion token, as training computes it) at theta_0. The screen reports

    cos_sgd  = cos(-g, d)          cos_adam = cos(-sign(g), d)

over all parameters, on the teacher's kept answers and, as its baseline, on the control data (the
reference's own answers, which carry no trait). Follow-up work finds this screen predicts transfer in
controlled models: teacher data whose first step covers the teacher's displacement more than the
control data does is data the student can learn the trait from. The score is also computed on `chunks`
disjoint parts of the data, for a spread (mean and 95% t-interval over chunks).

A system-prompted teacher has no weight displacement (the screen is skipped with that reason), and so do
API models. A LoRA teacher's adapter is merged before the difference is taken.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sublab.analysis.stats import mean_ci
from sublab.backends.base import ModelRef
from sublab.errors import SublabError
from sublab.records import atomic_write_json, read_jsonl

COVERAGE_VERSION = 1


def sft_gradient(
    model, tok, records: list[dict], batch_size: int = 64
) -> tuple[dict[str, torch.Tensor], int]:
    """The gradient of the mean per-token SFT loss (completion tokens and end token) over `records`, and
    their number of loss tokens (to combine gradients of parts into the whole's)."""
    import torch.nn.functional as F

    from sublab.backends.device import model_device
    from sublab.backends.hf_train import collate, encode_completion

    dev = model_device(model)
    enc = [encode_completion(tok, r["messages"]) for r in records]
    n_tok = sum(len(e.ids) - e.n_prompt for e in enc)
    params = dict(model.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    for b in range(0, len(enc), batch_size):
        ids, attn, lmask = (t.to(dev) for t in collate(enc[b : b + batch_size], tok.pad_token_id))
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        m = lmask[:, 1:]
        loss = F.cross_entropy(logits[m].float(), ids[:, 1:][m], reduction="sum") / max(1, n_tok)
        loss.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()
    }
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return grads, n_tok


def cosines(grad: dict[str, torch.Tensor], displacement: dict[str, torch.Tensor]) -> dict:
    """cos(-g, d) and cos(-sign(g), d) over all parameters (float64).

    >>> g = {"w": torch.tensor([1.0, -2.0])}
    >>> d = {"w": torch.tensor([-1.0, 0.0])}
    >>> {k: round(v, 4) for k, v in cosines(g, d).items()}
    {'cos_sgd': 0.4472, 'cos_adam': 0.7071}
    """
    dot_g = dot_s = gg = ss = dd = 0.0
    for n, d in displacement.items():
        g, d = grad[n].double().flatten(), d.double().flatten()
        s = torch.sign(g)
        dot_g += float(-(g @ d))
        dot_s += float(-(s @ d))
        gg += float(g @ g)
        ss += float(s @ s)
        dd += float(d @ d)
    denom = dd**0.5
    return {
        "cos_sgd": dot_g / (gg**0.5 * denom) if gg and dd else 0.0,
        "cos_adam": dot_s / (ss**0.5 * denom) if ss and dd else 0.0,
    }


def coverage_stage(
    teacher_json: Path,
    reference_json: Path,
    teacher_kept: Path,
    control_kept: Path,
    n: int,
    seed: int,
    out: Path,
    chunks: int = 4,
) -> dict:
    """The first-step coverage screen on up to n kept answers of the teacher and of the control data
    (drawn with the replicate seed) -> out (data/coverage.json)."""
    from sublab.backends.hf import load_hf

    teacher, reference = ModelRef.load(teacher_json), ModelRef.load(reference_json)
    base = {"version": COVERAGE_VERSION, "teacher": teacher.spec, "reference": reference.spec, "requested": n}
    reason = None
    if teacher.is_remote or reference.is_remote:
        reason = "API models: their weights, and so the teacher's displacement, are not available here"
    elif teacher.kind == "prompted":
        reason = "a system-prompted teacher has the reference's weights: there is no displacement to cover"
    if reason:
        res = base | {"skipped": reason}
        atomic_write_json(out, res)
        return res
    t_model, _ = load_hf(teacher)
    r_model, tok = load_hf(reference)
    t_params = dict(t_model.named_parameters())
    displacement = {
        name: (t_params[name].detach().float() - p.detach().float()) for name, p in r_model.named_parameters()
    }
    del t_model, t_params
    res = base | {
        "chunks": chunks,
        "displacement_norm": sum(float(d.double().norm() ** 2) for d in displacement.values()) ** 0.5,
    }
    for label, path in (("teacher_data", teacher_kept), ("control_data", control_kept)):
        records = read_jsonl(path, require_messages=True)
        if not records:
            raise SublabError(
                f"{path} has no kept answers: the coverage screen needs some; check the filter's "
                "statistics (filter_stats.json) or turn controls.coverage_examples off"
            )
        if len(records) > n:
            records = random.Random(f"coverage:{seed}:{label}").sample(records, n)
        parts = [sft_gradient(r_model, tok, records[i::chunks]) for i in range(chunks) if records[i::chunks]]
        total = sum(n for _, n in parts)
        # the whole data's per-token mean gradient is the token-weighted mean of its parts'
        whole_grad = {k: sum(g[k] * (n / total) for g, n in parts) for k in parts[0][0]}
        whole = cosines(whole_grad, displacement)
        per = [cosines(g, displacement) for g, _ in parts]
        res[label] = {
            "n": len(records),
            **whole,
            "cos_sgd_chunks": mean_ci([c["cos_sgd"] for c in per]),
            "cos_adam_chunks": mean_ci([c["cos_adam"] for c in per]),
        }
    res["difference"] = {k: res["teacher_data"][k] - res["control_data"][k] for k in ("cos_sgd", "cos_adam")}
    atomic_write_json(out, res)
    return res
