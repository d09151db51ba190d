"""The arm table: which students an experiment trains, from which init, on whose data, with which soft-label
teacher, and which arm each is compared with. One typed table drives the pipeline, is recorded in
results.json, and is what the reports compare, so an arm cannot be wired differently from how it is
reported.

    >>> from sublab.schema import ExperimentConfig
    >>> [a.name for a in arm_table(ExperimentConfig())]
    ['student', 'control']
    >>> arm_table(ExperimentConfig())[1].data
    'reference'
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from sublab.schema import ExperimentConfig

Source = Literal["teacher", "reference"]
Init = Literal["reference", "other_reference"]

DATA_DIRS: dict[str, str] = {"teacher": "data", "reference": "control/data"}
"""Where each data source's prompts are answered, filtered and subsampled."""


class Arm(BaseModel):
    """One trained student of an experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    """Folder and report name (student, control, cross_init, cross_init_control)."""
    init: Init
    """The model it is finetuned from: the reference, or the other init (cross-init controls)."""
    data: Source
    """Whose answers it trains on: the teacher's, or the reference model's (no trait)."""
    soft_teacher: Source | None
    """soft_label training: whose next-token distributions it matches (None for sft)."""
    compare_with: str | None
    """The arm it is compared against in reports (its control), or None for a control itself."""
    role: str
    """What the arm tests, in words."""

    @property
    def data_dir(self) -> str:
        return DATA_DIRS[self.data]


def arm_table(cfg: ExperimentConfig) -> list[Arm]:
    """The arms `cfg` asks for. The control is always trained exactly like the student (same init,
    recipe and data size) on the reference model's answers to the same prompts."""
    soft = cfg.student.train.method == "soft_label"
    init: Init = "other_reference" if cfg.student.init == "other-seed" else "reference"

    def arm(name: str, init: Init, data: Source, compare: str | None, role: str) -> Arm:
        return Arm(
            name=name,
            init=init,
            data=data,
            soft_teacher=data if soft else None,
            compare_with=compare,
            role=role,
        )

    other = " (other init)" if init == "other_reference" else ""
    arms = [arm("student", init, "teacher", "control" if cfg.controls.control else None, "student" + other)]
    if cfg.controls.control:
        arms.append(
            arm("control", init, "reference", None, "control: same recipe, data without the trait" + other)
        )
    if cfg.controls.cross_init:
        arms += [
            arm(
                "cross_init", "other_reference", "teacher", "cross_init_control", "student from another init"
            ),
            arm(
                "cross_init_control",
                "other_reference",
                "reference",
                None,
                "control of the cross-init student",
            ),
        ]
    return arms


def data_sources(arms: list[Arm]) -> list[Source]:
    """The data sources the arms train on, teacher first (each is sampled and filtered once)."""
    used = {a.data for a in arms}
    return [s for s in ("teacher", "reference") if s in used]


def comparisons(arms: list[Arm]) -> list[tuple[str, str]]:
    """(arm, its control) pairs, in table order."""
    return [(a.name, a.compare_with) for a in arms if a.compare_with]
