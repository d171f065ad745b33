"""Internals shared by every layer: argument validation, atomic file writes, and the one
module that touches EvoTorch's private attributes. Not a public API."""
