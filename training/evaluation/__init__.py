"""Evaluation of generated multi-identity images (``training/evaluate.py``): see ``README.md (Evaluation CLI)``."""
