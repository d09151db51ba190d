"""Evaluations: preference (favorite animal / tree), with question sets as package data."""
