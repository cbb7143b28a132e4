"""Evaluation of generated multi-identity images (``training/evaluate.py``): see ``training/EVALUATE.md``."""
