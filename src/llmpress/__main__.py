"""``python -m llmpress`` (what torchrun launches: ``torchrun --nproc-per-node N -m llmpress compress ...``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
