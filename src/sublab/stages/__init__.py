"""The stages of an experiment, in order: reference, teacher, prompts, sample, filter, train, evaluate. Each
reads files and writes files; pipeline.py wires them through the arm table."""
