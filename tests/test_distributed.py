"""Scale-out: the models under DistributedDataParallel (2 processes, gloo, CPU) and
nn.SyncBatchNorm.convert_sync_batchnorm."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import resnet_fast
from resnet_fast import autotune
from resnet_fast.models._fused import ConvPlan


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(resnet_fast.resnet18(num_classes=10))
        x, y = _data()  # every rank sees the same batch: averaged grads equal one process's
        loss = _step(model, x, y)
        if rank == 0:
            torch.save({"loss": loss, "state": model.module.state_dict()}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_matches_single_process(tmp_path, monkeypatch):
    # Both sides run the same kernels: the single process measures its per-layer choices
    # (oneDNN or Winograd for the training 3x3s) into a table of this test's own, which the
    # ranks, spawned after it with the same thread count and so the same keys, read. Measured
    # apart, the two sides chose differently now and then, and the stem's weight after the
    # step moved past the tolerance (4 runs in 13 on an AMX Xeon).
    monkeypatch.setenv("RESNET_FAST_CACHE_DIR", str(tmp_path / "tuning"))
    monkeypatch.setattr(autotune, "_default_cpu", None)
    # One thread, as each rank runs: the stem's weight gradient in channels_last (what the
    # training forward runs inside, as torch's own channels_last eager) sums in another order
    # with another thread count (~1e-4 after the step, for torchvision channels_last too).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        single = resnet_fast.resnet18(num_classes=10)
        loss = _step(single, *_data())
    finally:
        torch.set_num_threads(threads)
    assert autotune.cached_entries() > 0  # the choices the ranks will read
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert abs(ddp["loss"] - loss) < 1e-5
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_sync_batchnorm_conversion_keeps_the_fused_eval_path(monkeypatch):
    torch.manual_seed(0)
    model = resnet_fast.resnet18().eval()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnet_fast.resnet18()).eval()
    synced.load_state_dict(model.state_dict())
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    calls = []
    real = ConvPlan.__call__
    monkeypatch.setattr(ConvPlan, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(synced(x), expected)
    assert len(calls) == 21  # every conv of the synced model ran fused, and its fc
