"""``python -m asyncsgd`` is ``python -m asyncsgd.train``."""
import sys

from .train import main

sys.exit(main())
