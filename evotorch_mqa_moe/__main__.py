"""``python -m evotorch_mqa_moe`` = the ``evotorch-mqa-moe`` command."""

import sys

from .cli import main

sys.exit(main())
