"""Prompt generators for data unrelated to the trait (numbers; code and CoT come later)."""
