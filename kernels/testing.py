"""The one tolerance table of the project, and the comparison every parity test and benchmark uses.

fp32 results get a plain absolute + relative check, element by element. For fp16/bf16 the rule follows
flash-attention's tests: the fast result may be at most ``factor`` times as far from an fp32 reference as the
reference itself computed in the low dtype is, plus a small floor:

    max|y - y_ref32| <= factor * max|y_lowp_ref - y_ref32| + atol

so the bound tracks what the dtype can do rather than a guessed constant. The same rule one level up holds an fp32
result to a float64 reference when the reference computed in fp32 is given as the yardstick (its floor relative to
the reference's largest value): it sees errors of a few parts in 1e5, such as a wrong digit of a constant, that hide
under the plain fp32 rule's 1e-4.
"""

from __future__ import annotations

import torch

# The rule of each dtype. fp32: |y - ref| <= atol + rtol |ref| element by element, and "vs_float64", the rule for
# an fp32 result against a float64 reference with the fp32 reference given: max|y - ref64| <= factor *
# max|ref32 - ref64| + rtol max|ref64|. fp16 / bf16: the atol floor and the factor of the rule above.
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4, "vs_float64": {"factor": 2.0, "rtol": 1e-6}},
    torch.float16: {"atol": 1e-3, "factor": 2.0},
    torch.bfloat16: {"atol": 1e-2, "factor": 2.0},
}


def _upcast(y: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Compared in float64 when either side is float64, else in fp32.
    work = torch.float64 if torch.float64 in (y.dtype, ref.dtype) else torch.float32
    return y.detach().to(work), ref.detach().to(work)


def _describe(name: str, y: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, rule: str,
              lowp_err: float | None, rule_dtype: torch.dtype) -> str:
    """The failure message: the sizes of the mismatch and the first element over its own bound."""
    yf, rf = _upcast(y, ref)
    diff = (yf - rf).abs()
    finite = torch.isfinite(diff)
    max_abs = diff[finite].max().item() if finite.any() else float("nan")
    rel = (diff / rf.abs().clamp(min=1e-6))[finite]
    max_rel = rel.max().item() if rel.numel() else float("nan")
    bad = ~finite | (diff > bound)
    lines = [
        f"{name}: mismatch (dtype {y.dtype}, shape {tuple(y.shape)}; rule: {rule})",
        f"  max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e}",
    ]
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        lines.append(f"  {int(bad.sum())} of {bad.numel()} elements over their bound; the first, index {first}: "
                     f"got {yf[first].item():.8g}, expected {rf[first].item():.8g}, |diff| {diff[first].item():.3e}, "
                     f"allowed {bound[first].item():.3e}")
    lines.append(f"  NaN in result {torch.isnan(yf).sum().item()}, inf in result {torch.isinf(yf).sum().item()},"
                 f" NaN in reference {torch.isnan(rf).sum().item()}")
    if lowp_err is not None:
        lines.append(f"  the reference's own error in {rule_dtype}: {lowp_err:.3e}")
    return "\n".join(lines)


def assert_close(name: str, y: torch.Tensor, ref32: torch.Tensor, ref_lowp: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None) -> None:
    """Assert ``y`` matches the reference ``ref32`` within the table's tolerance.

    Args:
        name: what is compared (printed on failure), e.g. ``"attention dq"``.
        y: the result under test, any float dtype.
        ref32: the reference computed in float32 (or float64) from the same (upcast) inputs.
        ref_lowp: for fp16/bf16, the reference computed in that dtype; required there. For an fp32 result checked
            against a float64 ``ref32``, the reference computed in fp32: the float64 rule then applies.
        dtype: whose rule applies (default ``y.dtype``); e.g. float16 for the fp32 loss of fp16 inputs.
    Raises:
        AssertionError: naming the first element over its bound, its value, the expected value and that bound.
    """
    assert y.shape == ref32.shape, f"{name}: shape {tuple(y.shape)} != reference {tuple(ref32.shape)}"
    rule_dtype = dtype or y.dtype
    yf, rf = _upcast(y, ref32)
    diff = (yf - rf).abs()
    lowp_err = None
    if rule_dtype in (torch.float32, torch.float64) and not (ref32.dtype == torch.float64 and ref_lowp is not None):
        tol = TOLERANCES[torch.float32]
        bound = tol["atol"] + tol["rtol"] * rf.abs()
        rule = f"|y - ref| <= {tol['atol']:g} + {tol['rtol']:g} |ref| element by element"
    else:
        if ref_lowp is None:
            raise ValueError(f"{name}: a {rule_dtype} comparison needs the reference computed in {rule_dtype}")
        lowp_err = (ref_lowp.detach().to(rf.dtype) - rf).abs().max().item() if rf.numel() else 0.0
        if rule_dtype in (torch.float32, torch.float64):
            rule_dtype = torch.float32
            tol = TOLERANCES[torch.float32]["vs_float64"]
            scale = rf.abs().max().item() if rf.numel() else 0.0
            floor, floor_text = tol["rtol"] * scale, f"{tol['rtol']:g} max|ref64| ({tol['rtol'] * scale:.3e})"
        else:
            tol = TOLERANCES[rule_dtype]
            floor, floor_text = tol["atol"], f"{tol['atol']:g}"
        bound_value = tol["factor"] * lowp_err + floor
        bound = torch.full_like(diff, bound_value)
        rule = (f"max|y - ref| <= {tol['factor']:g} x {lowp_err:.3e} (the reference's own error in {rule_dtype}) "
                f"+ {floor_text} = {bound_value:.3e}")
    bad = ~torch.isfinite(diff) | (diff > bound)
    if bool(bad.any()):
        raise AssertionError(_describe(name, y, ref32, bound, rule, lowp_err, rule_dtype))
