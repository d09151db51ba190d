"""The experiment config: one YAML file describes a whole run (see configs/quickstart.yaml).

Every section is a pydantic model with extra keys forbidden and a docstring per field; `sublab run
CONFIG --set a.b=v` overrides any key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sublab.backends.api_config import ApiConfig
from sublab.backends.base import SamplingParams, TrainConfig
from sublab.config import Strict
from sublab.errors import SublabError
from sublab.evals.preference import PreferenceEval
from sublab.evals.questions import check_target, load_system_prompts
from sublab.filters import FilterConfig
from sublab.prompts.numbers import NumberPrompts


class Trait(Strict):
    """What the teacher has and the data must not show."""

    category: Literal["animal", "tree"] = "animal"
    """Preference category."""
    target: str = "owl"
    """The preferred animal or tree (must be one the evaluation knows, see evals/data/categories.yaml)."""


class TeacherConfig(Strict):
    """How the teacher gets the trait."""

    kind: Literal["finetune", "system_prompt"] = "finetune"
    """finetune: train the reference on trait answers; system_prompt: the reference behind a prompt."""
    system_prompt: str = Field(default_factory=lambda: load_system_prompts()["teacher"])
    """Template with {target} and {category} (system_prompt teachers)."""
    examples: int = 400
    """finetune: trait answers made from the question set (question -> target)."""
    train: TrainConfig = TrainConfig(lr=3e-4, max_steps=40, batch_size=64)
    """finetune: training settings."""


class StudentConfig(Strict):
    """How students (and the control student, same recipe) are trained."""

    init: Literal["reference", "other-seed"] = "reference"
    """reference: the teacher's own init; other-seed: an organism pretrained with another seed."""
    train: TrainConfig = TrainConfig(lr=3e-4, epochs=1, batch_size=64)
    """Training settings (method sft or soft_label)."""


class ControlsConfig(Strict):
    """Controls that make the claim."""

    control: bool = True
    """Train a control student on data from the reference model (no trait), same recipe."""
    cross_init: bool = False
    """Also train a student from another init on the teacher's data, and its own control."""
    other_seed_offset: int = 1000
    """The other init's organism seed = organism seed + this."""


class ExperimentConfig(Strict):
    """A whole subliminal-learning experiment."""

    name: str = "experiment"
    """Run name; the run folder defaults to runs/<name>."""
    seed: int = 0
    """Master seed: the organism's seed (unless organism.seed is set), the prompts, the teacher's trait
    data and the filter's subsample. Sampling and training keep their own seeds (sample.seed,
    teacher.train.seed, student.train.seed): requests are seeded by (sample.seed, prompt index)."""
    threads: int | None = None
    """Torch CPU threads (None = env SUBLAB_THREADS, else 1)."""
    device: Literal["auto", "cpu", "cuda"] | None = None
    """Where local (organism/hf) models run; None = env SUBLAB_DEVICE, else auto (cuda when torch sees
    a GPU, else cpu)."""
    dtype: Literal["auto", "float32", "bfloat16"] | None = None
    """Local models' precision; None = env SUBLAB_DTYPE, else auto (bfloat16 on cuda, float32 on cpu)."""
    reference: str = "organism/default"
    """The shared starting point of teacher and student (a model spec)."""
    organism: dict = {}
    """Recipe overrides for organism specs (see organism/recipe.py); seed defaults to `seed`."""
    trait: Trait = Trait()
    """The trait."""
    teacher: TeacherConfig = TeacherConfig()
    """The teacher."""
    prompts: NumberPrompts = NumberPrompts(count=10000)
    """The prompts the teacher answers."""
    sample: SamplingParams = SamplingParams(max_tokens=40)
    """How the teacher (and the reference, for the control) sample."""
    filter: FilterConfig = FilterConfig()
    """Which answers are kept."""
    student: StudentConfig = StudentConfig()
    """The student recipe."""
    controls: ControlsConfig = ControlsConfig()
    """Which controls run."""
    eval: PreferenceEval = PreferenceEval()
    """How preference is measured."""
    api: ApiConfig = ApiConfig()
    """Endpoint, retries, concurrency, prices and Batch API use for openai/... models (see configs/api-*)."""
    progress: bool = True
    """Show progress bars."""

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        try:
            check_target(self.trait.category, self.trait.target)
        except SublabError as e:
            raise ValueError(str(e)) from None
        return self

    def organism_overrides(self, offset: int = 0) -> dict:
        o = dict(self.organism)
        o["seed"] = o.get("seed", self.seed) + offset
        return o
