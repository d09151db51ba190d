"""The experiment config, apart from the code that runs it (as TRL keeps SFTConfig apart from its trainer):
one module per section, each a strict pydantic model with a docstring per field.

    experiment.py   ExperimentConfig: trait, teacher, prompts, sample, filter, student, controls, eval, api
    sampling.py     SamplingParams        train.py    TrainConfig, LoraSettings
    prompts.py      NumberPrompts         filter.py   FilterConfig, the banned-number lists
    evaluation.py   PreferenceEval        api.py      ApiConfig (endpoint, retries, prices, Batch API)
"""

from sublab.schema.experiment import ControlsConfig, ExperimentConfig, StudentConfig, TeacherConfig, Trait

__all__ = ["ControlsConfig", "ExperimentConfig", "StudentConfig", "TeacherConfig", "Trait"]
