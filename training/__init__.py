"""InstantFamily training: shard preparation, training, export, generation and evaluation on diffusers + accelerate.

A regular package (not a namespace one), so that this repository's ``training`` is the one imported even when
another installed distribution ships a top-level package of the same name. The command-line scripts run as files
(``python training/train.py``) or as modules (``python -m training.train`` from the repository root); see
``training/_bootstrap.py``.
"""
