"""Shared test set-up: the repository root and tests/ on sys.path (``support`` holds reusable generators),
and no network at import of insightface 0.7.3."""

import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for p in (TESTS, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
