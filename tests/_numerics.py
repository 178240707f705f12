"""The tolerance rule for reduced precision (docs/design.md, Tolerances): the error of ours
against an fp64 truth may be at most 2x the error of the same-dtype PyTorch reference against
that truth, plus a floor of two units of the dtype's precision at the magnitude of the largest
term summed (``magnitude``, default the output's): where the reference is exact (float64, whose
"truth" is itself) or cancels to zero error by luck, a kernel that rounds differently (an FMA,
one rounding instead of three) is still one or two ulps of its largest term away."""

import torch


def assert_within_reference_error(ours, reference_same_dtype, truth, magnitude=None):
    assert ours.dtype == reference_same_dtype.dtype
    if ours.numel() == 0:
        return
    t = truth.double()
    finite = torch.isfinite(t)
    # Non-finite outputs must match exactly (NaN where NaN, same infinities).
    assert torch.equal(torch.isnan(ours), torch.isnan(t)), "NaN positions differ"
    assert torch.equal(ours.double()[~finite & ~torch.isnan(t)], t[~finite & ~torch.isnan(t)])
    err_ours = (ours.double() - t)[finite].abs().max().item() if finite.any() else 0.0
    err_ref = (reference_same_dtype.double() - t)[finite].abs().max().item() if finite.any() else 0.0
    if magnitude is None:
        magnitude = t[finite].abs().max().item() if finite.any() else 1.0
    floor = 2 * torch.finfo(ours.dtype).eps * max(1.0, magnitude)
    assert err_ours <= 2 * err_ref + floor, (
        f"{ours.dtype}: error {err_ours:.3g} vs fp64 truth exceeds 2x the reference's "
        f"{err_ref:.3g} + floor {floor:.3g}")


def scale_shift_magnitude(x, scale, shift, residual):
    """The largest |x * scale| + |shift| + |residual|: the size of the terms scale_shift_act
    sums, for the floor above."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = x.double().abs() * scale.double().abs().view(shape) + shift.double().abs().view(shape)
    if residual is not None:
        m = m + residual.double().abs()
    finite = torch.isfinite(m)
    return m[finite].max().item() if finite.any() else 1.0
