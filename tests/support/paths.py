"""Where things are: the repository root (what every test's subprocess imports asyncsgd from) and an environment
for such subprocesses."""
from __future__ import annotations

import os

__all__ = ["REPO", "SUPPORT", "repo_env"]

SUPPORT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(SUPPORT))


def repo_env(base=None, **extra) -> dict:
    """``base`` (default: this process's environment) with PYTHONPATH set to the repository and ``extra`` added."""
    return {**(os.environ if base is None else base), "PYTHONPATH": REPO, **extra}
