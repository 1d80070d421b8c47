import copy

import pytest
import torch
from conftest import TinyNet, calibrated

from lightning_qat.quantization.convert import to_int8
from lightning_qat.quantization.engines import Engine
from lightning_qat.quantization.measure import layer_times


@pytest.mark.parametrize("mode", ["fx", "eager"])  # eager: inside its wrapper, the same names
def test_each_int8_layer_is_timed_beside_its_float_form_on_the_input_it_gets(digits8, mode):
    x, _ = next(iter(digits8.train_dataloader()))
    network = TinyNet().eval()
    int8 = to_int8(calibrated(copy.deepcopy(network), x, mode), mode, "x86", (x,))
    times = layer_times(int8, network, (x,), "x86", repeats=3, prefix=Engine.registry[mode].prefix)
    assert list(times) == ["conv1", "conv2", "fc1", "fc2"]  # fused with their BatchNorm / ReLU under the conv's name
    assert all(int8_ms > 0 and float_ms > 0 for int8_ms, float_ms in times.values())
    hooked = [m for net in (int8, network) for m in net.modules() if m._forward_pre_hooks]
    assert hooked == []  # taken off again
    assert torch.equal(int8(x), int8(x))
