"""The one tolerance table of the project, and the comparison every parity test uses.

fp32 results get a plain absolute + relative check. For fp16/bf16 the rule follows
flash-attention's tests: the fast result may be at most ``factor`` times as far from an fp32
reference as the reference itself computed in the low dtype is, plus a small floor:

    max|y - y_ref32| <= factor * max|y_lowp_ref - y_ref32| + atol

so the bound tracks what the dtype can do rather than a guessed constant.
"""

from __future__ import annotations

import torch

# dtype -> (atol, rtol) for fp32; (atol floor, factor) for low precision.
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 1e-3, "factor": 2.0},
    torch.bfloat16: {"atol": 1e-2, "factor": 2.0},
}


def _describe(name: str, y: torch.Tensor, ref: torch.Tensor, lowp_err: float | None, bound: float) -> str:
    yf, rf = y.detach().float(), ref.detach().float()
    diff = (yf - rf).abs()
    finite = torch.isfinite(diff)
    max_abs = diff[finite].max().item() if finite.any() else float("nan")
    rel = (diff / rf.abs().clamp(min=1e-6))[finite]
    max_rel = rel.max().item() if rel.numel() else float("nan")
    bad = (~finite) | (diff > bound)
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.any() else None
    lines = [
        f"{name}: mismatch (dtype {y.dtype}, shape {tuple(y.shape)})",
        f"  max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e}, allowed {bound:.3e}",
        f"  first mismatched index {first}"
        + (f": got {yf[first].item():.6g}, expected {rf[first].item():.6g}" if first is not None else ""),
        (f"  NaN in result {torch.isnan(yf).sum().item()}, inf in result {torch.isinf(yf).sum().item()},"
         f" NaN in reference {torch.isnan(rf).sum().item()}"),
    ]
    if lowp_err is not None:
        lines.append(f"  the reference's own error in {y.dtype}: {lowp_err:.3e}")
    return "\n".join(lines)


def assert_close(name: str, y: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor | None = None) -> None:
    """Assert ``y`` matches the fp32 reference ``ref32`` within the table's tolerance for y's dtype.

    Args:
        name: what is compared (printed on failure), e.g. ``"attention dq"``.
        y: the result under test, any float dtype.
        ref32: the reference computed in float32 from the same (upcast) inputs.
        ref_lowp: for fp16/bf16, the reference computed in y's dtype; required there.
    """
    assert y.shape == ref32.shape, f"{name}: shape {tuple(y.shape)} != reference {tuple(ref32.shape)}"
    yf, rf = y.detach().float(), ref32.detach().float()
    if y.dtype == torch.float32 or y.dtype == torch.float64:
        tol = TOLERANCES[torch.float32]
        bound_t = tol["atol"] + tol["rtol"] * rf.abs()
        ok = bool(torch.isfinite(yf).all()) and bool(((yf - rf).abs() <= bound_t).all())
        if not ok:
            raise AssertionError(_describe(name, y, ref32, None, float(bound_t.max())))
        return
    if ref_lowp is None:
        raise ValueError(f"{name}: a {y.dtype} comparison needs the reference computed in {y.dtype}")
    tol = TOLERANCES[y.dtype]
    lowp_err = (ref_lowp.detach().float() - rf).abs().max().item()
    bound = tol["factor"] * lowp_err + tol["atol"]
    ok = bool(torch.isfinite(yf).all()) and (yf - rf).abs().max().item() <= bound
    if not ok:
        raise AssertionError(_describe(name, y, ref32, lowp_err, bound))
