"""``python -m hf_wsvd.cli``: the ``hf-wsvd`` command line."""

import sys

from .app import console

sys.exit(console())
