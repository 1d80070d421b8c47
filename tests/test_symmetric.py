import pytest
import torch

from lightning_qat.quantization.symmetric import symmetric_scale


@pytest.mark.parametrize(("quant_min", "quant_max"), [(-128, 127), (-127, 127)])  # torch.ao's and x86's; XNNPACK's
def test_a_two_signed_channel_gets_the_fused_kernel_s_scale_bit_for_bit(quant_min, quant_max):
    """What QAT trained with before the mend, in every channel of both signs, for both int8 weight ranges."""
    torch.manual_seed(0)
    weight = torch.randn(64, 3, 3, 3) * torch.logspace(-3, 1, 64).reshape(-1, 1, 1, 1)
    low, high = torch.full((64,), float("inf")), torch.full((64,), float("-inf"))
    scale, zero_point = torch.ones(64), torch.zeros(64, dtype=torch.int32)
    on = torch.ones(1, dtype=torch.long)
    torch.fused_moving_avg_obs_fake_quant(
        weight, on, on, low, high, scale, zero_point, 0.01, quant_min, quant_max, 0, True, True
    )  # observes (the range), then its qparams from that range
    assert torch.equal(zero_point, torch.zeros(64, dtype=torch.int32))
    assert torch.equal(symmetric_scale(low, high, quant_min, quant_max), scale)


def test_a_channel_of_one_sign_gets_the_scale_of_its_range_and_an_empty_one_the_floor():
    low, high = torch.tensor([-0.5, 0.0, 0.0, -1.0]), torch.tensor([0.0, 0.25, 0.0, 1.0])
    scale = symmetric_scale(low, high, -128, 127, eps=2**-12)
    assert scale.tolist() == pytest.approx([0.5 / 128, 0.25 / 127, 2**-12, 1.0 / 127])
