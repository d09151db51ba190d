"""Defenses applied to the student's data (`defenses:`; docs/science.md, "Defenses and controls you can
switch on"). The other defenses live where they act: `student.train.optimizer` (sgd, signsgd),
`student.train.lora` (LoRA ranks against full finetuning), `student.train.early_stopping`,
`sample.min_p` (threshold sampling) and `filter.shuffle`."""

from __future__ import annotations

from sublab.config import Strict


class DefensesConfig(Strict):
    """Transforms of the data the student trains on. Each keeps the control comparable: paraphrasing
    applies to every source alike; mixing and masking change only the teacher's data, which the control
    never sees."""

    mask_divergence: bool = False
    """Leave the teacher's divergence tokens out of the loss of every student trained on the teacher's
    data (follow-up work: masking them removes most of the transfer). Divergence tokens are the
    positions where a counterfactual teacher (`controls.divergence_counterfactuals`) would pick another
    token than the teacher (meters/divergence.py). Local models only."""
    paraphrase: bool = False
    """Train on paraphrased prompts: every kept answer (of every source) is paired with another wording
    of the request its model answered (the same given numbers, count and format; prompts/numbers.py),
    drawn with the replicate seed. Domain numbers with generated prompts only."""
    mix_teachers: list[str] = []
    """Teacher mixing: other targets whose teachers (the teacher's recipe with that target) answer the
    same prompts; the student's data is then equal shares of the teacher's and each of theirs, the same
    size as before (trait kind preference)."""
