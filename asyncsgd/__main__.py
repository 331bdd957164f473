"""``python -m asyncsgd`` is ``python -m asyncsgd.train``."""
import sys

from asyncsgd.train import main

sys.exit(main())
