"""The tolerance table's comparison (kernels/testing.py): what each rule lets through, and failure messages that
name the first element over its own bound, with its value, the expected value and that bound."""

import pytest
import torch

from gpt2_kernels.testing import TOLERANCES, assert_close


def _message(*args, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        assert_close(*args, **kwargs)
    return str(info.value)


def test_fp32_relative_bound_names_the_element_over_its_own_bound():
    # Element 0 may be off by 0.1 (1e-4 + 1e-4 * 1000) and is off by 0.05; element 1 may be off by 2e-4 and is
    # off by 5e-4. The largest bound (0.1001) is no element's bound but the first's: the message must still find
    # element 1.
    ref = torch.tensor([1000.0, 1.0])
    y = torch.tensor([1000.05, 1.0005])
    msg = _message("rel", y, ref)
    assert "rel: mismatch (dtype torch.float32, shape (2,)" in msg
    assert "1 of 2 elements over their bound; the first, index (1,): got 1.0005" in msg
    assert "expected 1, |diff| 5.000e-04, allowed 2.000e-04" in msg
    assert_close("rel, within", torch.tensor([1000.05, 1.0001]), ref)


def test_fp32_absolute_bound_near_zero():
    ref = torch.zeros(3, 4)
    y = ref.clone()
    y[0, 1] = 0.5e-4  # within the 1e-4 floor
    y[1, 2] = 3e-4
    y[2, 0] = -2e-4
    msg = _message("abs", y, ref)
    assert "2 of 12 elements over their bound; the first, index (1, 2): got 0.0003" in msg
    assert "expected 0, |diff| 3.000e-04, allowed 1.000e-04" in msg
    assert "|y - ref| <= 0.0001 + 0.0001 |ref| element by element" in msg


def test_fp16_factor_rule_names_the_element_over_the_scalar_bound():
    # The fp16 reference is 2^-10 off the fp32 one: the bound is 2 x 2^-10 + 1e-3 = 2.953e-3. Element 0 is 2^-9 =
    # 1.95e-3 off (allowed), element 2 is 2^-7 = 7.8e-3 off (not).
    ref32 = torch.tensor([1.0, 2.0, 3.0])
    lowp = torch.tensor([1.0 + 2**-10, 2.0, 3.0], dtype=torch.float16)
    y = torch.tensor([1.0 + 2**-9, 2.0, 3.0 + 2**-7], dtype=torch.float16)
    msg = _message("fp16", y, ref32, lowp)
    assert "1 of 3 elements over their bound; the first, index (2,): got 3.0078125, expected 3" in msg
    assert "|diff| 7.812e-03, allowed 2.953e-03" in msg
    assert "the reference's own error in torch.float16: 9.766e-04" in msg
    assert "2 x 9.766e-04" in msg and f"+ {TOLERANCES[torch.float16]['atol']:g} = 2.953e-03" in msg
    assert_close("fp16, within", y[:2], ref32[:2], lowp[:2])
    with pytest.raises(ValueError, match="needs the reference computed in torch.float16"):
        assert_close("fp16 without its reference", y, ref32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_nan_is_a_mismatch_and_named(dtype):
    ref = torch.zeros(5)
    y = torch.zeros(5, dtype=dtype)
    y[2] = float("nan")
    y[4] = float("inf")
    msg = _message("nan", y, ref, ref.to(dtype) if dtype != torch.float32 else None)
    assert "2 of 5 elements over their bound; the first, index (2,): got nan, expected 0" in msg
    assert "NaN in result 1, inf in result 1, NaN in reference 0" in msg


def test_fp32_against_float64_sees_what_the_plain_rule_lets_through():
    # An fp32 result 2e-5 off (relative) everywhere passes the plain fp32 rule; against a float64 reference, with
    # the fp32 reference's own error as the yardstick, it fails, naming the float64 rule.
    g = torch.Generator().manual_seed(0)
    ref64 = torch.randn(50, 8, generator=g, dtype=torch.float64)
    ref32 = ref64.float()
    y = (ref64 * (1 + 2e-5)).float()
    assert_close("plain", y, ref64)
    assert_close("fp32 reference itself", ref32, ref64, ref32)
    msg = _message("strict", y, ref64, ref32)
    assert "the reference's own error in torch.float32" in msg
    assert "+ 1e-06 max|ref64| (" in msg and "over their bound; the first, index (" in msg


def test_rule_of_another_dtype():
    # The fp32 loss of fp16 inputs is judged by the fp16 rule: 2e-3 off is within 2 x 1e-3 + 1e-3, 4e-3 is not.
    ref32 = torch.tensor(10.0)
    lowp = torch.tensor(10.001)
    assert_close("loss", torch.tensor(10.002), ref32, lowp, dtype=torch.float16)
    msg = _message("loss", torch.tensor(10.004), ref32, lowp, dtype=torch.float16)
    assert "loss: mismatch (dtype torch.float32, shape ()" in msg
    assert "1 of 1 elements over their bound; the first, index (): got 10.004" in msg
    assert "the reference's own error in torch.float16" in msg
