"""Evolve multi-query-attention / mixture-of-experts transformers with EvoTorch."""
