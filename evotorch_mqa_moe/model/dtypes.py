"""Compute dtypes: the names ``--dtype`` accepts, checked to work on the device."""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
"""Names accepted by :func:`resolve_dtype` (``--dtype``) and the dtypes they stand for."""


def _dtype_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` does matrix arithmetic in ``dtype`` (a CUDA GPU must report bf16)."""
    if dtype == torch.bfloat16 and device.type == "cuda":
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return False
    try:
        a = torch.ones(2, 2, device=device, dtype=dtype)
        return bool(torch.isfinite((a @ a).softmax(-1).float().cpu()).all())
    except (RuntimeError, TypeError):  # the backend has no kernel for it
        return False


def resolve_dtype(dtype: str | torch.dtype | None,
                  device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype named by ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float64"``
    or that torch dtype; ``None``: float32), checked to work on ``device``.

    Raises:
        ValueError: an unknown name, or a dtype that ``device`` cannot compute in (e.g.
            bfloat16 on a GPU older than NVIDIA Ampere); the message names both.
    """
    if dtype is None:
        return torch.float32
    resolved = COMPUTE_DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if resolved not in COMPUTE_DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    device = torch.device(device if device is not None else "cpu")
    if resolved != torch.float32 and device.type != "meta" and not _dtype_works(resolved, device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ValueError(f"dtype {str(resolved).removeprefix('torch.')} is not supported on "
                         f"device {device} ({name}); use float32 there")
    return resolved
