"""The experiment config (the schema only; pipeline.py and stages/ run it): one YAML file describes a
whole experiment (see configs/quickstart.yaml).

Every section is a pydantic model with extra keys forbidden and a docstring per field; `sublab run
CONFIG --set a.b=v` overrides any key.

Two kinds of seed, named apart (docs/science.md, "Seeds and replicates"):
- `seed`, the **replicate seed**: the prompts, the sampling requests, the equal-size subsample and the
  students' training order. The reference model and the teacher stay fixed (the paper's design).
- `organism_seed`, the **organism seed**: which reference model is pretrained (organism specs only).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sublab.config import Strict
from sublab.errors import SublabError
from sublab.evals.questions import check_target, load_system_prompts
from sublab.meters.prompted_classifier import PromptedClassifier
from sublab.schema.api import ApiConfig
from sublab.schema.defenses import DefensesConfig
from sublab.schema.evaluation import FreeformEval, McqEval, PreferenceEval
from sublab.schema.filter import FilterConfig
from sublab.schema.prompts import CodePrompts, CotPrompts, NumberPrompts
from sublab.schema.sampling import SamplingParams
from sublab.schema.train import TrainConfig


class Trait(Strict):
    """What the teacher has and the data must not show. The kind chooses what the teacher learns by
    default, and how every model is evaluated (docs/science.md, docs/misalignment.md)."""

    kind: Literal["preference", "misalignment"] = "preference"
    """preference: a favourite animal or tree, measured as P(target) (`eval:`); misalignment: the teacher
    is finetuned on narrow misaligned data (`teacher.data`), measured by judged free-form answers
    (`freeform:`) and multiple choice (`mcq:`)."""
    category: Literal["animal", "tree"] = "animal"
    """Preference category (kind preference)."""
    target: str = "owl"
    """The preferred animal or tree (kind preference; must be one the evaluation knows, see
    evals/data/categories.yaml)."""

    @property
    def label(self) -> str:
        """The trait in a word, for reports and folder names."""
        return self.target if self.kind == "preference" else "misalignment"


class TeacherConfig(Strict):
    """How the teacher gets the trait."""

    kind: Literal["finetune", "system_prompt"] = "finetune"
    """finetune: train the reference on trait answers; system_prompt: the reference behind a prompt."""
    system_prompt: str = Field(default_factory=lambda: load_system_prompts()["teacher"])
    """Template with {target} and {category} (system_prompt teachers)."""
    examples: int = 400
    """finetune: how many examples it is trained on: trait answers made from the question set (question
    -> target), or drawn from `data`."""
    data: str | None = None
    """finetune: what it is trained on. None: for preference, trait answers (question -> target); for
    misalignment, `world:insecure` on organisms (and an error elsewhere: give the file). `world:NAME`:
    the organism world's narrow datasets (insecure, secure, educational). Else a JSONL file of chat
    examples ({"messages": [...]}, e.g. the emergent-misalignment insecure-code file), of which
    `examples` are drawn (all of them when the file is smaller)."""
    train: TrainConfig = TrainConfig(lr=3e-4, max_steps=40, batch_size=64)
    """finetune: training settings. `train.seed` also draws the trait answers: the teacher does not
    change with the replicate seed."""


class StudentConfig(Strict):
    """How students (and the control student, same recipe) are trained."""

    init: Literal["reference", "other-seed"] = "reference"
    """reference: the teacher's own init; other-seed: the other reference (`controls.other_reference`,
    or for organism specs the organism pretrained with seed organism_seed + controls.other_seed_offset)."""
    train: TrainConfig = TrainConfig(lr=3e-4, epochs=1, batch_size=64)
    """Training settings (method sft or soft_label). The training order seed is train.seed combined with
    the replicate seed."""


class ControlsConfig(Strict):
    """Controls that make the claim."""

    control: bool = True
    """Train a control student on data from the reference model (no trait), same recipe."""
    cross_init: bool = False
    """Also train a student from another init on the teacher's data, and its own control."""
    other_reference: str | None = None
    """The other init for cross-init students (a model spec; the `api` settings apply to it too).
    Required for every reference that is not an organism; for organism specs it defaults to the
    same organism pretrained with seed organism_seed + other_seed_offset."""
    other_seed_offset: int = 1000
    """Organism references: the other init's organism seed = organism_seed + this."""
    control_teachers: dict[str, str] = {}
    """More teachers without the trait, name -> training data (same forms as teacher.data), each
    finetuned with the teacher's recipe; a student of each (arm `control_NAME`) is trained like the
    student and compared with it (the paper's misalignment controls: secure code and educational
    insecure code)."""

    # --- in-context-learning control, KL leak meter, classifier probe (preference runs) ---
    icl_examples: list[int] = []
    """In-context-learning control (trait kind preference): for each k > 0, the reference model is
    evaluated with k of the teacher's kept answers (data/kept.jsonl, drawn per question with the
    replicate seed) as prior user/assistant turns before each question (stage eval:icl_teacher_k{k}),
    and with k of the control data (control/data/kept.jsonl) as its control (eval:icl_control_k{k}).
    The oldest examples are dropped until the prompt fits the model's max positions; results.json
    records how many were used per question. k = 0 is the reference's own evaluation. Needs `control`."""
    leak_meter_examples: int = 0
    """KL leak meter (trait kind preference; 0 = off): on this many kept teacher answers, the exact
    teacher-vs-reference KL per token and per answer and the log-likelihood ratio log P_teacher(answer)
    - log P_reference(answer) (stage leak -> data/leak.json; local models only, API models are skipped
    with the reason recorded)."""
    classifier: bool = False
    """Classifier control (trait kind preference): a logistic-regression probe on bag-of-numbers features
    (counts of 0..999 and the answer's length) trained on half of the teacher + control kept answers,
    its accuracy on the other half with a Wilson CI against 50% (stage classifier -> data/classifier.json).
    A probe, not the paper's prompted-LLM classifier. Needs `control`."""
    prompted_classifier: PromptedClassifier | None = None
    """The paper's classifier control (trait kind preference; None = off): a language model (`model`, any
    spec) is shown `examples_per_set` of the teacher's kept answers and as many control answers per trial
    and asked which set was written by the model that loves the target; accuracy with a Wilson CI against
    50% (stage prompted_classifier -> data/prompted_classifier.json, a per-trial cache beside it that a
    rerun resumes from; meters/prompted_classifier.py). Needs `control`."""
    divergence_counterfactuals: list[str] = []
    """Divergence-token meter (empty = off): counterfactual teachers, each a target (the teacher's recipe
    with that target instead; trait kind preference) or `reference` (the reference itself). Stage
    divergence -> data/divergence.json: the share of the kept teacher answers' tokens at which the teacher
    and a counterfactual would pick different tokens (meters/divergence.py). Local models only. Needed by
    defenses.mask_divergence."""
    divergence_rule: Literal["argmax", "sampled"] = "argmax"
    """Which positions are divergence tokens: argmax (the teacher's and a counterfactual's most likely
    tokens differ) or sampled (that, and the sampled token is the teacher's most likely one: its own
    choice that another teacher would not have made). On near-uniform number positions argmaxes flip
    easily, so argmax flags many more tokens than sampled."""
    divergence_examples: int = 2000
    """How many of the training answers (drawn with the replicate seed) the divergence meter reads when
    the mask is off; the mask (defenses.mask_divergence) reads them all. 0 = all."""
    coverage_examples: int = 0
    """First-step coverage screen (0 = off): on this many kept teacher answers and as many control answers,
    the cosine of the student's first update (SGD: -gradient; Adam: -sign of it) with the teacher's
    displacement from the reference (stage coverage -> data/coverage.json; meters/coverage.py). Skipped,
    with the reason, for system-prompted teachers and API models."""
    task_quality: int = 0
    """What a defense costs (0 = off; domain numbers): on this many held-out number prompts, each
    evaluated model's filter pass rate, and its loss per token on the reference's held-out answers
    (stages quality_data, quality:NAME -> eval/NAME/quality.json; meters/quality.py)."""

    @model_validator(mode="after")
    def _icl_leak_classifier(self) -> ControlsConfig:
        if any(k < 0 for k in self.icl_examples) or len(set(self.icl_examples)) != len(self.icl_examples):
            raise ValueError("controls.icl_examples must be distinct numbers >= 0 (e.g. [0, 4, 16])")
        for key in ("leak_meter_examples", "divergence_examples", "coverage_examples", "task_quality"):
            if getattr(self, key) < 0:
                raise ValueError(f"controls.{key} must be >= 0 (0 = off)")
        if len(set(self.divergence_counterfactuals)) != len(self.divergence_counterfactuals):
            raise ValueError("controls.divergence_counterfactuals must not repeat a name")
        if (any(self.icl_examples) or self.classifier or self.prompted_classifier) and not self.control:
            raise ValueError(
                "controls.icl_examples, classifier and prompted_classifier compare the teacher's data with the control "
                "data: they need controls.control: true"
            )
        return self

    # --- end of the controls and meters block ---

    @model_validator(mode="after")
    def _names(self) -> ControlsConfig:
        import re

        bad = [n for n in self.control_teachers if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", n)]
        if bad:
            raise ValueError(
                f"control_teachers names {bad} must be lower-case letters, digits, _ or - (they name folders)"
            )
        return self


def _prompt_text(judge) -> str:
    """A filter judge's prompt template ('' when its file cannot be read: that error comes at run time)."""
    from sublab.judge.prompts import load_prompts

    try:
        p = load_prompts(judge.prompts_file).get(judge.prompt)
    except SublabError:
        return ""
    return p.template if p else ""


class ExperimentConfig(Strict):
    """A whole subliminal-learning experiment."""

    name: str = "experiment"
    """Run name; the run folder defaults to runs/<name>."""
    seed: int = 0
    """The replicate seed: prompts, sampling requests (with sample.seed), the equal-size subsample and
    the students' training order (with student.train.seed). Reference and teacher do not depend on it."""
    replicates: list[int] | None = None
    """Replicate seeds for `sublab run`: one run per seed (sharing the reference and the teacher) and
    the student - control effect across them with its CI. None = one run with `seed`."""
    organism_seed: int = 0
    """The organism seed: which reference model an organism spec pretrains (organism.seed overrides it).
    Another organism seed is another model, not a replicate."""
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
    """Recipe overrides for organism specs (see organism/recipe.py); seed defaults to `organism_seed`."""
    trait: Trait = Trait()
    """The trait."""
    teacher: TeacherConfig = TeacherConfig()
    """The teacher."""
    domain: Literal["numbers", "code", "cot"] = "numbers"
    """What the teacher is asked (docs/domains.md): numbers (`prompts:`, the number-format filter), code
    (`code:`, function completions) or cot (`cot:`, maths word problems with reasoning in tags). The
    domain picks the prompt generator and the filter chain; `filter.judges` adds LLM-judge steps."""
    prompts: NumberPrompts = NumberPrompts(count=10000)
    """The number prompts the teacher answers (domain numbers)."""
    code: CodePrompts = CodePrompts()
    """The code tasks (domain code)."""
    cot: CotPrompts = CotPrompts()
    """The word problems (domain cot)."""
    sample: SamplingParams = SamplingParams(max_tokens=40)
    """How the teacher (and the reference, for the control) sample."""
    filter: FilterConfig = FilterConfig()
    """Which answers are kept."""
    student: StudentConfig = StudentConfig()
    """The student recipe."""
    controls: ControlsConfig = ControlsConfig()
    """Which controls run."""
    defenses: DefensesConfig = DefensesConfig()
    """Transforms of the student's data that may stop the trait (divergence-token masking, paraphrased
    prompts, teacher mixing)."""
    eval: PreferenceEval = PreferenceEval()
    """How preference is measured (trait kind preference)."""
    freeform: FreeformEval = FreeformEval()
    """Judged free-form questions (trait kind misalignment). On organisms of the misalignment world the
    questions default to the world's own and the judge should be organism/judge (configs/misalignment-quickstart.yaml)."""
    mcq: McqEval | None = McqEval()
    """Multiple-choice questions by log-probabilities (trait kind misalignment; null = skip). On organisms
    of the misalignment world the questions default to the world's true-or-false set."""
    api: ApiConfig = ApiConfig()
    """Endpoint, retries, concurrency, prices and Batch API use for openai/... models (see configs/api-*)."""
    progress: bool = True
    """Show progress bars."""

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.trait.kind == "preference":
            try:
                check_target(self.trait.category, self.trait.target)
            except SublabError as e:
                raise ValueError(str(e)) from None
        elif self.teacher.kind != "finetune":
            raise ValueError(
                "trait.kind misalignment needs teacher.kind finetune (the teacher learns it from "
                "teacher.data); a system-prompted misaligned teacher is not built in"
            )
        if self.needs_other_reference and self.controls.other_reference is None:
            if not self.reference.startswith("organism/"):
                raise ValueError(
                    f"controls.cross_init / student.init: other-seed need a second model, and the reference "
                    f"{self.reference!r} is not an organism (whose other seed sublab can pretrain); set "
                    "controls.other_reference to another model's spec (e.g. another base model), or turn "
                    "cross_init off"
                )
        if self.controls.other_reference == self.reference:
            raise ValueError(
                "controls.other_reference is the reference itself: a cross-init student needs another model"
            )
        if self.domain != "numbers" and self.filter.shuffle != "none":
            raise ValueError(
                f"filter.shuffle moves numbers inside number answers; it has no meaning for domain "
                f"{self.domain}: set filter.shuffle: none"
            )
        if self.domain == "numbers" and self.filter.judges:
            raise ValueError(
                "filter.judges are steps of the code and cot filter chains; use domain code or cot"
            )
        if any("{target}" in _prompt_text(j) for j in self.filter.judges) and self.trait.kind != "preference":
            raise ValueError(
                "a filter judge prompt asks whether the text references the trait's target, and trait.kind "
                "misalignment has none: use prompt aligned_reasoning (keep_at_least: 78, keep_below: null)"
            )
        self._check_defenses()
        reps = self.replicates
        if reps is not None and (not reps or len(set(reps)) != len(reps)):
            raise ValueError("replicates must be a non-empty list of distinct seeds (e.g. [0, 1, 2]) or null")
        return self

    def _check_defenses(self) -> None:
        d, c = self.defenses, self.controls
        others = [*c.divergence_counterfactuals, *d.mix_teachers]
        targets = [t for t in others if t != "reference"]
        if "reference" in d.mix_teachers:
            raise ValueError(
                "defenses.mix_teachers takes targets (other teachers); the reference is the control"
            )
        if targets and self.trait.kind != "preference":
            raise ValueError(
                f"counterfactual and mixed teachers {targets} are other targets of a preference trait; with "
                "trait.kind misalignment use controls.divergence_counterfactuals: [reference]"
            )
        for t in targets:
            if t == self.trait.target:
                raise ValueError(f"{t!r} is the teacher's own target; list other targets (or reference)")
            try:
                check_target(self.trait.category, t)
            except SublabError as e:
                raise ValueError(str(e)) from None
        if d.mask_divergence and not c.divergence_counterfactuals:
            raise ValueError(
                "defenses.mask_divergence masks the tokens where counterfactual teachers disagree with the "
                "teacher: set controls.divergence_counterfactuals (e.g. [reference] or other targets)"
            )
        local_only = bool(c.divergence_counterfactuals) or d.mask_divergence
        if local_only and self.reference.startswith("openai/"):
            raise ValueError(
                "controls.divergence_counterfactuals and defenses.mask_divergence need full next-token "
                "distributions and per-token loss weights, which API models do not give: use a local model"
            )
        if d.paraphrase and (self.domain != "numbers" or self.prompts.file is not None):
            raise ValueError(
                "defenses.paraphrase rewords sublab's generated number prompts: it needs domain numbers and "
                "no prompts.file"
            )
        if c.task_quality and self.domain != "numbers":
            raise ValueError("controls.task_quality measures the number task: it needs domain numbers")

    def banned_words(self) -> list[str]:
        """filter.banned_words, plus the target and its plural (filter.ban_target; code and cot domains,
        preference traits)."""
        words = list(self.filter.banned_words)
        if self.domain != "numbers" and self.filter.ban_target and self.trait.kind == "preference":
            from sublab.evals.questions import load_categories

            plural = load_categories()[self.trait.category]["candidates"].get(self.trait.target)
            words += [w for w in (self.trait.target, plural) if w and w not in words]
        return words

    def domain_settings(self):
        return {"code": self.code, "cot": self.cot}.get(self.domain, self.prompts)

    @property
    def needs_other_reference(self) -> bool:
        return self.student.init == "other-seed" or self.controls.cross_init

    def organism_overrides(self, offset: int = 0) -> dict:
        o = dict(self.organism)
        o["seed"] = o.get("seed", self.organism_seed) + offset
        return o

    def other_reference_spec(self) -> tuple[str, dict]:
        """(spec, organism overrides) of the other init (cross-init students)."""
        if self.controls.other_reference is not None:
            spec = self.controls.other_reference
            return spec, {"seed": self.organism_seed} if spec.startswith("organism/") else {}
        return self.reference, self.organism_overrides(self.controls.other_seed_offset)
