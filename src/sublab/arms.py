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

Init = Literal["reference", "other_reference"]
Source = str
"""Whose answers: "teacher", "reference", "teacher_NAME" (a control teacher, controls.control_teachers),
or "other_TARGET" (a teacher with another target whose answers are mixed in: defenses.mix_teachers)."""

DATA_DIRS: dict[str, str] = {"teacher": "data", "reference": "control/data"}
"""Where each data source's prompts are answered, filtered and subsampled (control teachers: data_dir())."""


def data_dir(source: Source) -> str:
    """teacher -> data, reference -> control/data, teacher_NAME -> controls/NAME/data,
    other_TARGET -> other_TARGET/data."""
    if source in DATA_DIRS:
        return DATA_DIRS[source]
    if source.startswith("other_"):
        return f"{source}/data"
    return f"controls/{source.removeprefix('teacher_')}/data"


class Arm(BaseModel):
    """One trained student of an experiment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    """Folder and report name (student, control, cross_init, cross_init_control)."""
    init: Init
    """The model it is finetuned from: the reference, or the other init (cross-init controls)."""
    data: Source
    """Whose answers it trains on: the teacher's, the reference model's (no trait), or a control
    teacher's (teacher_NAME)."""
    soft_teacher: Source | None
    """soft_label training: whose next-token distributions it matches (None for sft)."""
    compare_with: tuple[str, ...]
    """The arms it is compared against in reports (its controls); empty for a control itself."""
    role: str
    """What the arm tests, in words."""

    @property
    def data_dir(self) -> str:
        return data_dir(self.data)


def arm_table(cfg: ExperimentConfig) -> list[Arm]:
    """The arms `cfg` asks for. The control is always trained exactly like the student (same init,
    recipe and data size) on the reference model's answers to the same prompts."""
    soft = cfg.student.train.method == "soft_label"
    init: Init = "other_reference" if cfg.student.init == "other-seed" else "reference"

    def arm(name: str, init: Init, data: Source, compare: tuple[str, ...], role: str) -> Arm:
        return Arm(
            name=name,
            init=init,
            data=data,
            soft_teacher=data if soft else None,
            compare_with=compare,
            role=role,
        )

    other = " (other init)" if init == "other_reference" else ""
    controls = (("control",) if cfg.controls.control else ()) + tuple(
        f"control_{n}" for n in cfg.controls.control_teachers
    )
    arms = [arm("student", init, "teacher", controls, "student" + other)]
    if cfg.controls.control:
        arms.append(
            arm("control", init, "reference", (), "control: same recipe, data without the trait" + other)
        )
    for n, data in cfg.controls.control_teachers.items():
        arms.append(
            arm(f"control_{n}", init, f"teacher_{n}", (), f"student of control teacher {n} ({data})" + other)
        )
    if cfg.controls.cross_init:
        arms += [
            arm(
                "cross_init",
                "other_reference",
                "teacher",
                ("cross_init_control",),
                "student from another init",
            ),
            arm(
                "cross_init_control",
                "other_reference",
                "reference",
                (),
                "control of the cross-init student",
            ),
        ]
    return arms


def data_sources(arms: list[Arm]) -> list[Source]:
    """The data sources the arms train on, teacher first, then the reference, then control teachers in
    table order (each is sampled and filtered once)."""
    used = list(dict.fromkeys(a.data for a in arms))
    return [s for s in ("teacher", "reference") if s in used] + [s for s in used if s.startswith("teacher_")]


def comparisons(arms: list[Arm]) -> list[tuple[str, str]]:
    """(arm, one of its controls) pairs, in table order."""
    return [(a.name, c) for a in arms for c in a.compare_with]
