"""Several processes (torchrun): the process group, DDP or FSDP2 wrapping, each rank's share of a global batch, sums.

A run is one process unless torchrun (or `--nproc`) starts more. With the strategy "single" on one process, every
function here is the identity, so the training code has one path for all cases. The rules that keep the optimisation
independent of the number of ranks:
- a global batch is split into equal contiguous shares, rank r taking the r-th (`rank_share`);
- a loss is a sum over items divided by the item count of the *global* batch (`World.sum` of the local counts);
- DDP and FSDP average gradients over ranks, so each rank's loss is multiplied by the world size to make that average
  a sum (`World.size` in `train_step`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("rlhfkit")

STRATEGIES = ("single", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    strategy: str = "single"

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows the progress bar and writes the final model."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts and loss sums stay exact)."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(size * N, ...) the ranks' (N, ...) tensors, rank 0's first."""
        if self.size == 1:
            return tensor
        parts = [torch.empty_like(tensor, device=self._comm_device()) for _ in range(self.size)]
        dist.all_gather(parts, tensor.to(self._comm_device()))
        return torch.cat([p.to(tensor.device) for p in parts])

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable; tensors on the CPU), rank 0's first."""
        if self.size == 1:
            return [obj]
        parts = [None] * self.size
        dist.all_gather_object(parts, obj)
        return parts

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(strategy: str, timeout_s: float) -> World:
    """Join the process group torchrun set up (environment RANK, WORLD_SIZE, ...): nccl on GPUs, gloo on CPUs.

    "ddp" or "fsdp" on one process without torchrun makes a group of one, so a run can continue on one process
    from a checkpoint written on several.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if strategy == "single":
        if size > 1:
            from rlhfkit.config import ConfigError

            raise ConfigError(f"strategy: torchrun started {size} processes, but the strategy is single; "
                              "pass --strategy ddp or --strategy fsdp")
        return World()
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # not under torchrun: a group of one on this machine
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            check_gpu_count(local_rank + 1, "torchrun --nproc-per-node")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                  strategy=strategy)
    if not world.main:  # one voice: the other ranks only report problems
        log.setLevel(logging.WARNING)
    return world


def check_gpu_count(ranks: int, option: str = "--nproc") -> None:
    """Each local rank takes a GPU of its own, so a machine with GPUs needs one per rank (CUDA would otherwise stop
    with 'invalid device ordinal' in the middle of start-up). `option`: what set the number of ranks."""
    if torch.cuda.is_available() and ranks > torch.cuda.device_count():
        from rlhfkit.config import ConfigError

        count = torch.cuda.device_count()
        raise ConfigError(f"nproc: {ranks} ranks on this machine need {ranks} GPUs, one each, and it has {count}; "
                          f"use {option} {count}, or run the ranks on the CPU with CUDA_VISIBLE_DEVICES= (empty)")


def launch(command: str, argv: list[str], nproc: int) -> int:
    """`rlhfkit COMMAND ARGV` on `nproc` ranks of this machine, started by torchrun's agent in this process; returns
    0; 2 when the ranks stopped on a mistake in the config or data (exit code 2: each printed its one-line error, as
    one process does); 1 when a rank failed otherwise (the agent stops the others; its table, printed here, names the
    rank and exit code); or 128 + the signal that stopped this process.

    In this process, not `python -m torch.distributed.run`: that would be one more interpreter importing torch, on
    the cores the ranks start on."""
    import sys

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The ranks run under torchrun already; torchrun would also misread --nproc as its own --nproc-per-node.
    argv = [a for i, a in enumerate(argv) if not a.startswith("--nproc=") and a != "--nproc"
            and (i == 0 or argv[i - 1] != "--nproc")]
    try:
        with _agent_here(nproc):
            run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "rlhfkit", command, *argv]))
    except ChildFailedError as failed:
        if {failure.exitcode for failure in failed.failures.values()} == {2}:
            return 2
        print(failed, file=sys.stderr, flush=True)
        return 1
    except SignalException as stop:
        if stop.sigval == signal.SIGINT:  # Ctrl-C: as in one process (rlhfkit says --resume continues)
            raise KeyboardInterrupt from None
        return 128 + int(stop.sigval)
    return 0


@contextlib.contextmanager
def _agent_here(nproc: int):
    """torchrun's agent in this process, leaving it as it was: the ranks' thread count in the environment (torchrun
    gives each rank 1 unless told, and warns; they share this machine's cores), the agent's log line on a failed rank
    silenced (its table says it all), and the signal handlers it installs (and never removes) put back."""
    threads = os.environ.get("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = threads or str(max(1, cores // nproc))
    agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    try:
        yield
    finally:
        if threads is None:
            del os.environ["OMP_NUM_THREADS"]
        agent_log.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_share(items: list, world: World) -> list:
    """Rank r's contiguous share of a global batch; len(items) must be a multiple of the world size."""
    if len(items) % world.size:
        raise ValueError(f"a global batch of {len(items)} does not split evenly over {world.size} ranks")
    per = len(items) // world.size
    return items[world.rank * per:(world.rank + 1) * per]


def strided_share(items: list, world: World) -> tuple[list, int]:
    """(items rank::size, padded by repeating its last item so every rank holds the same count; the real count).

    For evaluation, where each rank scores a share and `gather_share` puts the global order back: under FSDP every rank
    must run the same number of forward passes.
    """
    share = items[world.rank::world.size]
    per = -(-len(items) // world.size)
    real = len(share)
    return share + share[-1:] * (per - real) if share else items[:1] * per, real


def gather_share(values: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """The (n, ...) values of all items in their global order, from each rank's (per, ...) values of `strided_share`."""
    if world.size == 1:
        return values[:n]
    per = values.shape[0]
    stacked = world.gather(values).reshape(world.size, per, *values.shape[1:])
    return stacked.transpose(0, 1).reshape(world.size * per, *values.shape[1:])[:n]


def wrap_model(model: torch.nn.Module, world: World, *, dtype: str = "float32", cpu_offload: bool = False
               ) -> torch.nn.Module:
    """The trained model as the strategy needs it: unchanged (single), DDP, or FSDP2 with each decoder layer a unit.

    FSDP: `cpu_offload` keeps parameters, gradients and optimizer state on the CPU; dtype bfloat16 computes in bf16
    and reduces gradients in float32.
    """
    model.to(world.device)
    if world.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # No buffer broadcast in each forward: a causal LM's buffers (rotary tables) are constants, and a broadcast
        # would make forward-only passes collective. torch 2.13 renamed the option (and warns at the old name).
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel)
                   .parameters else "broadcast_buffers")
        return DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None,
                                       **{no_sync: False})
    if world.strategy == "fsdp":
        _fully_shard(model, dtype, cpu_offload)
    return model


def place_frozen(model: torch.nn.Module, world: World, *, shard: bool, dtype: str = "float32") -> torch.nn.Module:
    """A frozen model (PPO's reference or reward model): a whole copy on every rank, or with `shard` (FSDP only)
    sharded like the trained models, which makes its every forward pass collective. A whole copy computed in bf16
    keeps its linear layers' weights in bf16 (`store_linear_weights`)."""
    if shard and world.strategy == "fsdp":
        model.to(world.device)
        _fully_shard(model, dtype, cpu_offload=False)
        return model
    if dtype == "bfloat16":
        store_linear_weights(model, torch.bfloat16)
    return model.to(world.device)


def store_linear_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the weights and biases of `model`'s linear layers in `dtype`, for a frozen model that only ever runs
    under autocast to `dtype`: autocast caches its casts of trained weights only, so it would cast a frozen model's
    weights again at every call (on a 30M Llama, about 180 MB of memory traffic per forward pass). The products are
    the same bit for bit. A head tied to the input embedding stays as it is (the embedding is not autocast)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in embeddings:
            module.to(dtype)


def _fully_shard(model: torch.nn.Module, dtype: str, cpu_offload: bool) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if cpu_offload and not torch.cuda.is_available():
        log.warning("fsdp_cpu_offload: ignored, the model already lives in CPU memory (no GPU)")
        cpu_offload = False
    precision = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if dtype == "bfloat16" else MixedPrecisionPolicy())
    options = dict(mp_policy=precision, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    # The root must be the module whose forward every call enters: a PEFT model's generate() goes straight to the
    # model inside, so that one is the root (it holds every parameter, the adapters included).
    fully_shard(model.base_model.model if hasattr(model, "peft_config") else model, **options)


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """The model with its full weights on every rank for a stretch of forward passes that ranks run different
    numbers of (generation stops at different lengths): FSDP gathers every unit once and keeps it until the end,
    so no collective runs inside. Yields the module to call (DDP's inner module: its forward hooks are for
    training)."""
    units = _fsdp_units(model)
    if not units:
        yield unwrap(model)
        return
    units[0].set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        units[0].set_reshard_after_forward(True)
        units[0].set_reshard_after_forward(False, recurse=False)  # FSDP's default: the root stays gathered
        for unit in units:
            unit.reshard()


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module):
    """peft's `disable_adapter()` on the PEFT model in `model` (which may be DDP-wrapped or FSDP-sharded).

    peft switches `requires_grad` on the adapter weights as it goes in and out. Under FSDP those switches must land
    on the sharded parameters, which FSDP copies the flag from at every unshard; a unit left gathered after a forward
    pass (the root is) would take them on its temporary full parameters instead, and its adapter weights would
    silently stop training. So every unit is resharded on the way in and on the way out."""
    units = _fsdp_units(model)
    for unit in units:
        unit.reshard()
    peft_model = next(m for m in unwrap(model).modules() if hasattr(m, "peft_config"))
    with peft_model.disable_adapter():
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()


def _fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP-sharded modules inside `model`, the root first (none unless the strategy is fsdp)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the class names transformers lists in `_no_split_modules`."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (its _no_split_modules is empty)")
    return layers


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so there is nothing to remove)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient reduction for all but the last micro-batch of a step: the reduced sum is the same."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def full_tensor(value):
    """A plain tensor from what FSDP may return as a DTensor (a gradient norm, a sharded parameter)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
