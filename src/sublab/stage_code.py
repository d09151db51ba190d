"""The code each stage runs: module names whose source is part of the stage's key (runs.Run.stage), so
a change to that code reruns the stage and everything downstream."""

MODEL_CODE = ("sublab.backends",)
CODE = {
    "reference": ("sublab.stages.reference", "sublab.backends.registry", "sublab.organism"),
    "teacher": ("sublab.stages.teacher", *MODEL_CODE),
    "prompts": ("sublab.stages.prompts", "sublab.prompts", "sublab.domains"),
    "sample": ("sublab.stages.sample", *MODEL_CODE),
    "filter": ("sublab.stages.filter", "sublab.filters", "sublab.schema.filter"),
    "chain": (
        "sublab.stages.filter",
        "sublab.filters",
        "sublab.schema.filter",
        "sublab.domains",
        "sublab.judge",
        "sublab.organism.recipe",  # an organism judge's preset
    ),
    "subsample": ("sublab.stages.filter",),
    "train": ("sublab.stages.train", *MODEL_CODE),
    "eval": ("sublab.stages.evaluate", "sublab.evals", *MODEL_CODE),
}

ICL_CODE = ("sublab.controls", "sublab.evals", *MODEL_CODE)
METER_CODE = ("sublab.meters",)
