"""Evaluation of generated multi-identity images (``training/evaluate.py``): see ``docs/evaluation.md``."""
