"""``python -m evotorch_mqa_moe`` = the ``evotorch-mqa-moe`` command."""

import sys

from evotorch_mqa_moe.workflow.cli import main

sys.exit(main())
