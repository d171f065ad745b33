"""Counter-based random numbers: a number is a pure function of its keys and its index,
so any slice of a stream can be regenerated on demand, on any device, in any chunking.

A stateful generator (``torch.Generator``) must be run from the start to reach the
k-th number; here ``normals(key, count)`` *is* numbers ``0 .. count-1`` of stream
``key``, and ``normals(key, count, start=k)`` the ones from k on. A population whose
perturbations are such streams keeps one key per generation instead of its noise:
the forward pass and the update regenerate each chunk's noise when they need it
(:mod:`evotorch_mqa_moe.searchers.lowrank_noise`).

The hash is PCG's output permutation on 32-bit words ("PCG-hash", Jarzynski & Olano,
"Hash Functions for GPU Rendering", JCGT 2020), written with int64 tensors: every
product stays below 2**63 (multipliers < 2**30 on 32-bit words), so torch computes
it exactly, element by element, the same on every device and with any number of
threads. Gaussians come from two hashed uniforms by Box-Muller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MASK", "hash32", "derive_key", "uniforms", "normals"]

MASK = 0xFFFFFFFF
_MULT, _INC, _OUT = 747796405, 2891336453, 277803737
_SECOND = 0x68E31DA4  # decorrelates the second uniform of a Box-Muller pair


def hash32(x):
    """PCG-hash of 32-bit words: an int64 tensor of values in [0, 2**32) (or a Python
    int) -> the same kind, values in [0, 2**32)."""
    state = (x * _MULT + _INC) & MASK
    word = (((state >> ((state >> 28) + 4)) ^ state) * _OUT) & MASK
    return (word >> 22) ^ word


def derive_key(*parts: int) -> int:
    """One 32-bit key from integers (a seed, a generation, a block number, ...):
    hashed in turn, so ``derive_key(a, b) != derive_key(b, a)``."""
    key = 0x9E3779B9
    for part in parts:
        key = hash32(key ^ (int(part) & MASK))
        key = hash32(key ^ ((int(part) >> 32) & MASK))
    return key


def _words(keys: Tensor, count: int, start: int, salt: int) -> Tensor:
    """(*keys.shape, count) hashed words of indices ``start .. start+count-1``."""
    index = torch.arange(start, start + count, device=keys.device, dtype=torch.int64)
    mixed = hash32((keys.unsqueeze(-1) ^ salt) & MASK)
    return hash32(mixed ^ (hash32(index & MASK) ^ (index >> 32)))


def uniforms(keys: Tensor, count: int, *, start: int = 0, dtype=torch.float32) -> Tensor:
    """(*keys.shape, count) uniforms in (0, 1] of streams ``keys`` (int64, 32-bit values)."""
    return (_words(keys, count, start, 0).to(torch.float64) + 1.0).mul_(2.0**-32).to(dtype)


def normals(keys: Tensor, count: int, *, start: int = 0, dtype=torch.float32) -> Tensor:
    """(*keys.shape, count) standard normals, numbers ``start .. start+count-1`` of
    streams ``keys`` (an int64 tensor of 32-bit keys, any shape, on the target device).

    Box-Muller in float32 (float64 for a float64 ``dtype``) from two hashed words per
    number: ``sqrt(-2 ln u1) cos(2 pi u2)``, ``u1`` in (0, 1] so the log is finite.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u1 = (_words(keys, count, start, 0).to(work) + 1.0).mul_(2.0**-32)
    u2 = _words(keys, count, start, _SECOND).to(work).mul_(2.0**-32)
    return u1.log_().mul_(-2.0).sqrt_().mul_(torch.cos(u2.mul_(2.0 * math.pi))).to(dtype)
