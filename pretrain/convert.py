"""`python -m pretrain.convert`: the checkpoint converter (pretrain/checkpoint/convert.py) under its short name."""

import sys

from pretrain.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
