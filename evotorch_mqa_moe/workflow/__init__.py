"""The workflow around a search: ``run`` (loop, budgets, checkpoints, resume),
``compare``, ``tune``, loggers and the command line.

Imports nothing itself, so that ``evotorch-mqa-moe --help`` starts without torch.
"""
