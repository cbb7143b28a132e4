"""Delegate for the scripts in ``tools/`` run as files: runs ``training/_bootstrap.py``, the repository's one import
bootstrap (the repository root first on ``sys.path``, its packages checked against shadowing ones)."""

import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "_bootstrap.py"))
