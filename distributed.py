"""
Training over several processes: torchrun starts one per device and sets RANK, LOCAL_RANK and
WORLD_SIZE. train.py uses DDP by default (every process holds the whole base), or FSDP2 with
--fsdp=true, for a base too large for one device:

    torchrun --nproc_per_node=8 train.py --model=<folder> --data=<json> --fsdp=true
    torchrun --nnodes=2 --node_rank=<0 or 1> --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=<node 0's host>:29500 train.py --model=<folder> --data=<json> \\
             --fsdp=true                                  # the same command on both machines

What FSDP shards here is the frozen base: every Block and the root (embeddings, final norm, head)
are fully_shard'ed over the processes, built on the meta device and filled from the checkpoint so
that each process reads one tensor at a time and keeps its own part of it
(checkpoints.load_model(shard=...)). Each forward and backward gathers a block's weights just
before it runs and frees them after. The adapter is attached afterwards and stays whole on every
process: it is a few MB (sharding it would save nothing), its gradients are averaged once a step
(average_gradients, as DDP does), and so its optimizer state, resume.pt and
adapter_model.safetensors are exactly those of a one-process run. On a CPU the processes talk
over gloo (tests/test_distributed.py runs two); on GPUs over NCCL.

Every run starts here: `with session(device, dtype, threads) as rt:` gives what all of a process's
steps share (rt: device, dtype, the autocast context, rank, world, master), and ends the process
group on every way out.
"""
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import partial
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import adapters
from checkpoints import load_model
from cli import ConfigError, device_and_dtype, fail
from slots import slots


def setup(device="", dtype="", threads=0):
    """--device, --dtype, --threads -> rt: device, dtype, autocast context and the processes
    torchrun started (RANK, LOCAL_RANK and WORLD_SIZE; init)."""
    try:
        device, dtype = device_and_dtype(device, dtype)
    except ConfigError as e:
        fail(e)
    rank, world, device = init(device)
    if threads:
        torch.set_num_threads(threads)
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    adapters.fast_fp32_matmuls(device, dtype)
    return SimpleNamespace(device=device, dtype=dtype, ctx=ctx, rank=rank, world=world,
                           master=rank == 0)


@contextmanager
def session(device="", dtype="", threads=0):
    """setup(...) for a `with` body, and the process group ended on every way out (teardown: a
    finished run first waits for every process, a failed one not)."""
    rt, finished = setup(device, dtype, threads), False
    try:
        yield rt
        finished = True
    finally:
        teardown(rt.world, finished)


def init(device, timeout_s=1800):
    """Join the processes torchrun started (no-op for one) -> (rank, world size, this process's
    device: cuda:LOCAL_RANK on CUDA)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
        if device.type == "cuda":
            device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
            torch.cuda.set_device(device)
    return rank, world, device


def shard_base(model, device, dtype):
    """A model on the meta device -> its base frozen, in dtype, every Block and then the root
    fully_shard'ed over all processes, and this process's parts allocated on `device` (empty: the
    checkpoint fills them)."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.requires_grad_(False).to(dtype)  # on meta: nothing is allocated yet
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root: embeddings, final norm, head (tied or not)
    return model.to_empty(device=device)


def load_sharded(path, device, dtype, quantize=""):
    """checkpoints.load_model with the base split over the processes (FSDP2)."""
    if quantize:
        raise ValueError(f"--quantize={quantize} with --fsdp=true: a quantized base keeps its "
                         "packed weights and scales in buffers, which FSDP does not shard; "
                         "give one or the other")
    return load_model(path, device, dtype, shard=partial(shard_base, device=device, dtype=dtype))


def add_adapter(model, kind, **options):
    """adapters.add_adapter on a sharded base; the adapter comes out whole on every process. The
    root's weights are gathered while it is attached (prompt tuning starts its soft tokens from
    rows of the embedding); a tensor it computed from a block's sharded weight (DoRA's ||W|| per
    row) is gathered whole."""
    model.unshard()
    try:
        adapters.add_adapter(model, kind, **options)
    finally:
        model.reshard()
    for _, _, slot in slots(model):
        for module in slot.modules():
            for name, p in module._parameters.items():
                if isinstance(p, DTensor):
                    module._parameters[name] = nn.Parameter(p.full_tensor(),
                                                            requires_grad=p.requires_grad)
    return model


def average_gradients(params, world):
    """The adapter's gradients averaged over the processes, in one all-reduce (what DDP does, for
    the parameters FSDP does not manage)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def is_sharded(model):
    return any(isinstance(p, DTensor) for p in model.parameters())


def teardown(world, finished):
    """End the process group on every path. After a finished run, first wait for every process
    (rank 0 may still be writing files): a process that exits while another still holds the group
    can die with SIGABRT in gloo's teardown. After an error, no waiting: the others may never get
    there."""
    if world > 1 and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
