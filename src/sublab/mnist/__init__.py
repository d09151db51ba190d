"""The auxiliary-logit experiment on small MLPs (the paper's "general case"), run as a batched ensemble.

    sublab mnist configs/mnist.yaml [--set distill.loss=mse] [--out runs/x]

Modules: config.py (the YAML schema), data.py (offline loaders), ensemble.py (N MLPs as batched
tensors), train.py (teacher training and distillation), theorem.py (first-step inner products and
teacher-loss changes), stats.py (means and t-intervals), report.py (results.json, report.md, figures),
experiment.py (the command: arms, pairing, sweep).
"""
