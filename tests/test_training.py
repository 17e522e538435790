"""training.py's collectives across two gloo processes (forked here, no torchrun): the stop decision every
process takes together, the elementwise maximum, and the share check of a minibatch; a fresh autocast context
per use, and the one unwrap every save goes through."""
import multiprocessing
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from common import UserError, read_safetensors
from gpt import save_checkpoint
from hf import export_hf
from common import unwrap
from training import StopFlag, all_reduce_max, all_reduce_mean, check_divisible, setup


def collective_worker(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = SimpleNamespace(ddp=True, cuda=False, device="cpu", rank=rank, world=2)
    stop = StopFlag()
    before = stop.requested_anywhere(ctx)
    stop.requested = rank == 1           # a signal that reached the second process only
    after = stop.requested_anywhere(ctx)
    x = torch.tensor([float(rank), 5.0 - rank])
    queue.put((rank, before, after, all_reduce_max(x, ctx).tolist(), all_reduce_mean(x, ctx).tolist()))
    dist.destroy_process_group()


def test_a_stop_requested_in_one_process_stops_both_and_max_is_elementwise():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp = multiprocessing.get_context("fork")
    queue = mp.Queue()
    procs = [mp.Process(target=collective_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [r[1:3] for r in results] == [(False, True), (False, True)]
    assert all(r[3] == [1.0, 5.0] and r[4] == [0.5, 4.5] for r in results)


def test_check_divisible_and_one_process():
    check_divisible(4, "--minibatch", SimpleNamespace(world=2))
    with pytest.raises(UserError, match="--minibatch 3 must be a multiple of the 2 processes"):
        check_divisible(3, "--minibatch", SimpleNamespace(world=2))
    stop, x = StopFlag.__new__(StopFlag), torch.tensor([1.0, 2.0])   # no signal handlers in the test process
    stop.requested = False
    assert stop.requested_anywhere(None) is False
    assert torch.equal(all_reduce_max(x, None), x) and torch.equal(all_reduce_mean(x, None), x)


# ----------------------------------------------------------------------------- precision and unwrapping

def test_each_use_gets_a_fresh_autocast_context():
    """One shared autocast object entered twice, nested, leaves autocast on after the outer block (the state of
    its second entry is the one it restores): ctx.autocast() must hand out a new context each call."""
    ctx = setup(SimpleNamespace(device="cpu", seed=0, compile=None, threads=0))
    assert ctx.autocast() is not ctx.autocast()
    shared = torch.autocast("cpu", dtype=torch.bfloat16)   # the defect, shown on CPU autocast
    with shared:
        with shared:
            pass
    stuck = torch.is_autocast_enabled("cpu")
    torch.set_autocast_enabled("cpu", False)
    assert stuck


class DDPLike(torch.nn.Module):
    """What DistributedDataParallel looks like from outside: the wrapped model under .module."""

    def __init__(self, model):
        super().__init__()
        self.module = model


def test_one_unwrap_for_ddp_around_compile(tmp_path, tiny_model, small_enc):
    """training.wrap_model builds DDP(torch.compile(model)); every save peels .module, then ._orig_mod."""
    wrapped = DDPLike(torch.compile(tiny_model))
    assert unwrap(wrapped) is tiny_model and unwrap(torch.compile(tiny_model)) is tiny_model and unwrap(tiny_model) is tiny_model
    save_checkpoint(str(tmp_path / "ckpt"), wrapped, small_enc, {"stage": "test"})
    names = read_safetensors(str(tmp_path / "ckpt" / "model.safetensors"))
    assert names and not any(k.startswith(("_orig_mod", "module")) for k in names)
    export_hf(wrapped, str(tmp_path / "hf"))
    assert not any(k.startswith(("_orig_mod", "module")) for k in read_safetensors(str(tmp_path / "hf" / "model.safetensors")))
