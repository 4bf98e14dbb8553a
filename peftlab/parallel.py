"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DDP or FSDP2
keeps them in step. Without torchrun there is one process and every helper here is a no-op.

Every process computes the same batch plan and takes its share of each global batch, so batch
size, gradient accumulation and the learning-rate schedule mean the same for 1 or N processes,
and a checkpoint (full tensors, written by rank 0) resumes under any number of them.
"""

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# auto shards (FSDP) once the trained weights with their gradients and AdamW moments (16 bytes a
# parameter in fp32) pass this per process; below it DDP's replicas cost less communication
FSDP_BYTES = 8 * 2**30


def launched() -> bool:
    """True in a process that torchrun started with others."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes in the environment: gloo for CPU tensors, NCCL
    for CUDA ones (PyTorch picks by the tensor's device)."""
    if launched() and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 writes metrics, logs, checkpoints and reports; the others only compute."""
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@contextmanager
def first(leader: bool) -> Iterator[None]:
    """The leader runs the block before the others (which may then read what it wrote)."""
    if not leader:
        barrier()
    yield
    if leader:
        barrier()


def resolve(strategy: str, model: nn.Module) -> str:
    """'none' in one process; else 'ddp' or 'fsdp' ('auto': by the size of the trained state)."""
    if world() == 1:
        return "none"
    if strategy != "auto":
        return strategy
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return "fsdp" if 16 * trained > FSDP_BYTES else "ddp"


# -- training: each process's share of a batch ------------------------------------------------

def share(idx: np.ndarray, weight: Callable[[np.ndarray], float] = len) -> tuple[np.ndarray, float]:
    """This process's rows of a global batch, and the factor that makes its mean loss count as
    its part of the batch mean: DDP and FSDP average gradients over processes, so a process
    holding a fraction f of the batch's weight (rows, or target tokens) scales by f * world."""
    n = world()
    if n == 1:
        return idx, 1.0
    mine = idx[rank()::n]
    if len(mine) == 0:  # a batch smaller than the world: every process must still run fwd/bwd
        return idx[:1], 0.0
    return mine, n * weight(mine) / weight(idx)


def all_sum(*values: float) -> list[float]:
    """The sums over processes (one all-reduce for all values)."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_max(*values: float) -> list[float]:
    return _reduce(values, dist.ReduceOp.MAX)


def _reduce(values: tuple[float, ...], op) -> list[float]:
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_done(done: bool) -> bool:
    """True once every process is done: under FSDP each forward is collective, so processes
    step together until the last one finishes."""
    if world() == 1:
        return done
    t = torch.tensor([0 if done else 1])
    dist.all_reduce(t)
    return int(t) == 0


def my_batches(batches: list) -> tuple[list, int]:
    """This process's evaluation batches, padded with repeats so every process runs as many
    forwards (FSDP's all-gathers need them all); the number of real ones."""
    n = world()
    if n == 1:
        return batches, len(batches)
    mine = batches[rank()::n]
    count = -(-len(batches) // n)
    return mine + [batches[0]] * (count - len(mine)), len(mine)


def sum_arrays(a: np.ndarray) -> np.ndarray:
    """Elementwise sum over processes (each fills its own rows of a zero array)."""
    if world() == 1:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))
    dist.all_reduce(t)
    return t.numpy()


def gather_objects(obj) -> list:
    """Every process's `obj`, in rank order."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def gather_rng(state: torch.Tensor) -> torch.Tensor:
    """Each process's torch RNG state stacked (world, n); one process: the state itself."""
    if world() == 1:
        return state
    out = [torch.empty_like(state) for _ in range(world())]
    dist.all_gather(out, state)
    return torch.stack(out)


def set_rng(saved: torch.Tensor) -> None:
    """Restore this process's RNG from a checkpoint written by any number of processes; a
    process the checkpoint did not have draws from a stream of its own."""
    states = saved if saved.dim() == 2 else saved[None]
    if rank() < len(states):
        torch.set_rng_state(states[rank()].clone())  # a row view: set_rng_state would read from its storage's start
    else:
        torch.set_rng_state(states[0])
        torch.manual_seed(torch.randint(2**62, ()).item() + rank())


# -- full tensors in, full tensors out ---------------------------------------------------------

def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (collective: every process calls it); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `ref`: this process's shard when `ref` is an FSDP shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor) and t.shape == ref.shape and t.dim() > 0:
        return distribute_tensor(t.to(ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
    return t


def full_state(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Complete copies of the named parameters (under FSDP gathered from every shard: an adapter
    saved under FSDP is whole, not rank 0's slice)."""
    keep = set(names)
    return {n: full(p.detach()).clone() for n, p in model.named_parameters() if n in keep}


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into the model's parameters (sharding them under FSDP)."""
    params = dict(model.named_parameters())
    for n, t in state.items():
        params[n].copy_(like(t, params[n]))


# -- wrapping ----------------------------------------------------------------------------------

class _Loss(nn.Module):
    """A module whose forward is a batch's loss, for DDP to wrap: the loss may come from the full
    model, its top on cached features, or the LM head, and DDP sees the same parameters."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args):
        return self.fn(*args)


def wrap(model: nn.Module, batch_loss: Callable, strategy: str, unused: bool = False) -> Callable:
    """Prepare the model for data-parallel training; returns the batch-loss function to train with.

    ddp: gradients all-reduced in buckets during backward (`unused`: some trained parameters sit
    out some batches, as other tasks' heads in multi-task runs). fsdp: each transformer block and
    the rest are sharded in place (FSDP2); the model keeps its parameter names.
    """
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(_Loss(model, batch_loss), find_unused_parameters=unused, forward_sync_buffers=False)
        return ddp
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        lm_head = model.arch.lm_head
        if lm_head is not None and all(m is not lm_head for m in model.modules()):
            # the LM head sits beside the body in the HF model; inside the root unit it shares the
            # sharded embedding it is tied to (else it would keep a stale, untrained copy)
            known = {id(p) for p in model.parameters()}
            for p in lm_head.parameters():
                if id(p) not in known:  # untied: it does not train in one process either
                    p.requires_grad_(False)
            model.add_module("lm_head", lm_head)
        for block in model.arch.blocks:
            fully_shard(block)
        # the root's own tensors (embeddings, final norm, heads) stay gathered after a forward:
        # the LM head and the decoder read them outside the root's forward
        fully_shard(model, reshard_after_forward=False)
        if hasattr(model, "hidden"):
            register_fsdp_forward_method(model, "hidden")
    return batch_loss


def sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def inference(fn: Callable) -> Callable:
    """torch.inference_mode around `fn(model, ...)`, or no_grad when the model is sharded: FSDP
    keeps its gathered weights in buffers it refills when training, and inference_mode would mark
    them read-only for autograd."""
    @functools.wraps(fn)
    def run(model: nn.Module, *args, **kwargs):
        if not sharded(model):
            with torch.inference_mode():
                return fn(model, *args, **kwargs)
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:  # weights gathered without autograd must not serve the next training forward
            model.reshard()
    return run


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Within: an FSDP model's root tensors are whole, for code that calls its parts directly
    (the decoder runs the body and LM head step by step)."""
    if sharded(model):
        model.unshard()
    yield


# -- launching ---------------------------------------------------------------------------------

def launch(argv: list[str], nproc: int) -> int:
    """`peftlab train --nproc N ...`: run the same command under torchrun on this machine (its
    launcher in this process), and return the processes' exit code. The processes say what
    went wrong (rank 0 alone): torchrun's own tracebacks and warnings are left out."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's default of one thread per process leaves cores idle: share them out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # each of torchrun's modules sets its own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "peftlab", *argv]))
    except SignalException:  # Ctrl-C reached the processes too: rank 0 says where the run was saved
        return 130
    except ChildFailedError as e:
        return e.get_first_failure()[1].exitcode
    return 0
