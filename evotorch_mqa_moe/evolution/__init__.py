"""Evolution operators: flat kernels on ``(P, N)`` populations (cross-over, mutation,
selection), their EvoTorch operator classes, adaptive step sizes, safe mutation and
the GA built from them.

The kernels' public names are gathered in :mod:`evotorch_mqa_moe.evolution.functional`.
"""
