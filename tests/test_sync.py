"""Observer synchronization across ranks (gloo, 2 processes) and SyncBatchNorm inside fused QAT modules."""

import copy

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TinyNet, pretrained_tiny, trainer_kwargs
from lightning.pytorch.plugins import TorchSyncBatchNorm

from lightning_qat import QATCallback
from lightning_qat.quantization import ao
from lightning_qat.quantization.convert import cpu_eval_copy, to_int8
from lightning_qat.quantization.prepare import prepare_model
from lightning_qat.quantization.sync import all_reduce_observers


def _observer_ranges(net):
    return {
        name: (fq.activation_post_process.min_val.clone(), fq.activation_post_process.max_val.clone())
        for name, fq in ao.fake_quant_modules(net)
    }


def _sync_worker(rank: int, init_file: str, images: torch.Tensor, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = prepare_model(TinyNet(), "x86", "fx", [], (images[:2],)).module.train()
        with torch.no_grad():
            net(images[rank * 64 : (rank + 1) * 64] * (1 + 2 * rank))  # different data and ranges per rank
        before = _observer_ranges(net)
        synced = all_reduce_observers(net)
        qparams = {name: (fq.scale.clone(), fq.zero_point.clone()) for name, fq in ao.fake_quant_modules(net)}
        with ao.quiet():
            expected = {name: fq.calculate_qparams() for name, fq in ao.fake_quant_modules(net)}
        results[rank] = (synced, before, _observer_ranges(net), qparams, expected)
    finally:
        dist.destroy_process_group()


def test_all_reduce_observers_takes_min_and_max_over_ranks_and_refreshes_qparams(tmp_path, digits8):
    images = digits8.splits["train"].tensors[0][:128]
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), images, results), nprocs=2, join=True)
    (n0, before0, after0, q0, expected0), (n1, before1, after1, q1, expected1) = results[0], results[1]

    assert n0 == n1 == len(before0) > 0
    assert any(not torch.equal(before0[k][0], before1[k][0]) for k in before0)  # the ranks saw different data
    for name, (low, high) in after0.items():
        torch.testing.assert_close(low, torch.minimum(before0[name][0], before1[name][0]), msg=name)
        torch.testing.assert_close(high, torch.maximum(before0[name][1], before1[name][1]), msg=name)
        assert torch.equal(after1[name][0], low), name
        assert torch.equal(after1[name][1], high), name
    for name in q0:
        assert torch.equal(q0[name][0], q1[name][0]), name
        assert torch.equal(q0[name][1], q1[name][1]), name
        torch.testing.assert_close(q0[name][0], expected0[name][0], msg=name)
        torch.testing.assert_close(q1[name][0], expected1[name][0], msg=name)


def test_all_reduce_observers_is_a_no_op_without_a_process_group():
    net = prepare_model(TinyNet(), "x86", "fx", [], (torch.randn(2, 1, 8, 8),)).module
    assert all_reduce_observers(net) == 0


def test_sync_batchnorm_inside_fused_qat_modules_trains_and_converts_like_batchnorm(tmp_path, digits8, float_tiny):
    """What `Trainer(sync_batchnorm=True)` does to the prepared network (DDP itself needs GPUs for it)."""
    pl.seed_everything(0)
    model = pretrained_tiny(float_tiny)
    qat = QATCallback(evaluate=None, export=[])
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=1, max_steps=2, callbacks=[qat]))
    trainer.fit(model, datamodule=digits8)
    plain = copy.deepcopy(model.net)
    synced = TorchSyncBatchNorm().apply(model.net)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == 2  # the BNs of conv1, conv2
    x, _ = digits8.splits["val"].tensors
    int8 = {}
    for name, net in (("plain", plain), ("synced", synced)):
        net.train()
        with torch.no_grad():
            net(x[:64])  # a training forward: BN statistics and observers move (one process: local statistics)
        ao.freeze_bn_stats(net)
        eval_copy = cpu_eval_copy(net)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in eval_copy.modules())
        int8[name] = to_int8(eval_copy, "fx", "x86", (x[:2],))
    with torch.no_grad(), ao.quiet():
        assert torch.equal(int8["synced"](x), int8["plain"](x))
