"""int8 vs fp32 CPU latency of torchvision resnet18 at batch 1 (x86 backend), through the callback's own
prepare/convert path, measured side by side in one process. Run: python benchmarks/int8_latency.py
(The full benchmark suite of issue 6 is still to come.)
"""

import copy

import torch
import torchvision

from lightning_qat import convert, prepare
from lightning_qat.evaluate import measure_latency

torch.manual_seed(0)
m = torchvision.models.resnet18(num_classes=10).eval()
f = copy.deepcopy(m)
ex = (torch.randn(1, 3, 224, 224),)
p = prepare.prepare_model(m, "x86", "auto", [], ex)
for _ in range(3):
    p.module(torch.randn(4, 3, 224, 224))
q = convert.to_int8(p.module, p.mode, "x86", ex)
for t in (1, 2):
    torch.set_num_threads(t)
    r = measure_latency({"float": f, "int8": q}, ex, "x86", repeats=15)
    print(
        f"resnet18 224px batch1 threads={t}: float {r['float']:.2f} ms, int8 {r['int8']:.2f} ms, "
        f"speedup {r['float'] / r['int8']:.2f}x"
    )
