import numpy as np
import onnx
import torch
from conftest import DeadChannel, one_signed_qat
from onnx import TensorProto, helper, numpy_helper

from lightning_qat.export.onnx import OnnxRuntimeNetwork, onnx_bytes
from lightning_qat.export.qdq_graph import float_bias_where_int32_misses
from lightning_qat.quantization import ao


def test_a_bias_the_int32_grid_cannot_hold_stays_float_in_the_graph(tmp_path, digits8):
    """timm's mobilenetv2_100, QAT-trained on digits, scored 0.119 in ONNX Runtime against int8's 0.844: a depthwise
    channel with a dead input had a folded weight scale of 36, and ONNX Runtime's int32 bias (on the grid of input x
    weight scale) missed its bias by 16 output steps. That layer's bias is now a float Add after it."""
    prepared, x = one_signed_qat(digits8, net_cls=DeadChannel)
    ao.freeze_bn_stats(prepared)
    ao.set_observers(prepared, False)
    path = tmp_path / "dead.onnx"
    path.write_bytes(onnx_bytes(prepared.eval(), (x[:2],)))
    with torch.no_grad(), ao.quiet():
        expected = prepared(x[:256])
    out = OnnxRuntimeNetwork(path)(x[:256])
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.99
    assert (out - expected).abs().mean() <= 0.02 * expected.abs().mean()
    adds = [node for node in onnx.load(str(path)).graph.node if node.op_type == "Add"]
    assert [node.output[0] for node in adds] == ["/depthwise.0/Conv_output_0"]  # the one layer, no other


def _gemm(bias: np.ndarray, beta: float) -> onnx.ModelProto:
    """x -> Q/DQ (scale 0.1) -> Gemm with an int8 weight of scale 5 -> Q/DQ (scale 0.01): an int32 bias step of 0.5."""
    weight = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    constants = {
        "sx": np.float32(0.1), "zx": np.uint8(128), "w": weight, "sw": np.float32(5.0), "zw": np.int8(0),
        "b": bias.astype(np.float32), "so": np.float32(0.01), "zo": np.uint8(0),
    }  # fmt: skip
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
        helper.make_node("Gemm", ["xd", "wd", "b"], ["y"], transB=1, beta=beta),
        helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_linear_bias_off_the_int32_grid_is_added_in_float_scaled_by_beta(tmp_path):
    """A Gemm whose bias (0.2, scaled by beta 0.5) is off its int32 grid (steps of 0.1 x 5): ONNX Runtime's int8 kernel
    rounds it to 0, 10 output steps off; moved into a float Add, the output is what int8 with a float bias computes."""
    model = _gemm(np.array([0.2, -0.2, 0.4]), beta=0.5)
    assert float_bias_where_int32_misses(model) == ["y"]
    path = tmp_path / "gemm.onnx"
    onnx.save(model, str(path))
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, -0.2, 0.0, 0.3]])
    expected = x @ (5.0 * torch.arange(-6.0, 6.0).reshape(3, 4)).T + 0.5 * torch.tensor([0.2, -0.2, 0.4])
    expected = torch.clamp(torch.round(expected / 0.01), 0, 255) * 0.01
    assert torch.allclose(OnnxRuntimeNetwork(path)(x), expected, atol=1e-6)
    on_grid = _gemm(np.array([0.5, -1.0, 1.5]), beta=1.0)  # on its grid: left to the int8 kernel
    assert float_bias_where_int32_misses(on_grid) == []
