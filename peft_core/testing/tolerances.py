"""How closely outputs must agree: exactly, or up to the rounding of the dtype they were computed in.

Outputs that should be *identical* (identity init, disabled adapters, save -> load, switching
adapters) are compared bit for bit. Outputs that agree only up to rounding (merged vs unmerged,
unmerge after merge) use ``rtol`` and ``atol = rtol * max(1, max|expected|)``:

* float32: 1e-4. A merged weight is rounded once per element, while an unmerged layer rounds
  the base and adapter products separately: a few ulps (about 1e-6 relative) per layer.
* bfloat16: 5e-2. Its 8-bit mantissa (eps 2**-7) makes one rounding of a merged weight already
  about 4e-3 relative, and the differences pass through several layers.
"""

from __future__ import annotations

import torch

__all__ = ["assert_identical", "assert_outputs_close", "tolerance"]

_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``rtol`` and the ``atol`` per unit of output scale for outputs that agree up to rounding."""
    rtol = _RTOL.get(dtype, 1e-4)
    return {"atol": rtol, "rtol": rtol}


def assert_outputs_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` equals ``expected`` up to ``dtype``'s rounding tolerance, scaled by the output size."""
    tol = tolerance(dtype)
    scale = max(1.0, float(expected.detach().float().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().float(),
        expected.detach().float(),
        rtol=tol["rtol"],
        atol=tol["atol"] * scale,
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def assert_identical(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")
