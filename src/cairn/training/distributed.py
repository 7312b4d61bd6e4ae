"""Training on many processes, as torchrun starts them: process group, model wrapping, rank-0 writes.

cairn launches no processes and exchanges no gradients itself: `torchrun` starts one process per
device and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; `torch.distributed` (NCCL on
CUDA, gloo on CPU) does the rest. A `Dist` holds what the training loop needs to know about that:

- which device this rank uses (cuda:LOCAL_RANK on GPUs) and whether it is rank 0, the only one
  that writes files and logs;
- how the model is wrapped: DDP (a full copy per rank, gradients all-reduced) or FSDP2's
  `fully_shard` per block and at the root (parameters, gradients and optimizer state sharded);
- small collectives whose results every rank must agree on (token counts, losses, stop flags),
  and "rank 0 does it, the others wait for the outcome" for file work.

Without torchrun (or with one process) a `Dist()` stands for the plain single-process run and
every method is a no-op, so the loop has one code path.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from cairn.config.sections import SystemConfig
from cairn.util.errors import CairnError, option, SharedError
from cairn.util.host import usable_cores
from cairn.model.transformer import Transformer
from cairn.runtime.device import pick_device
from cairn.training.optim import MuonWithAdamW, Optimizer

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

T = TypeVar("T")

# Rank 0 alone tokenizes a new corpus and writes checkpoints while the others wait for it; on a big
# corpus or a slow shared filesystem that takes far longer than a training collective should.
FILE_WAIT_S = 3600


def torchrun_env() -> Optional[dict[str, int]]:
    """The ranks torchrun (or SLURM through torchrun) put in the environment, or None without it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        env = {k: int(os.environ.get(k, default)) for k, default in
               (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"))}
    except ValueError:
        raise CairnError("RANK, WORLD_SIZE, LOCAL_RANK or LOCAL_WORLD_SIZE is not a number: "
                         "launch distributed training with torchrun") from None
    return env


def _rank_device(name: str, local_rank: int) -> torch.device:
    device = pick_device(name)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise CairnError(f"LOCAL_RANK {local_rank} has no GPU of its own ({n} visible): "
                             f"start at most {n} processes per node ({option('nproc_per_node')})")
        return torch.device("cuda", local_rank)  # one GPU per process, whatever index --device names
    if device.type != "cpu":
        raise CairnError(f"distributed training runs on CUDA (NCCL) or CPU (gloo), not {device.type}: "
                         f"use {option('system.device')} cuda or cpu")
    return device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: torch.device = torch.device("cpu")
    parallel: str = "single"  # "single" (no process group), "ddp" or "fsdp"
    timeout_s: int = 0
    file_group: Optional[dist.ProcessGroup] = None  # a gloo group with a long timeout, for waits on rank 0's file work

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.parallel == "fsdp"

    def describe(self) -> str:
        backend = dist.get_backend() if self.enabled else "none"
        return (f"{self.world} processes ({self.parallel.upper()}, {backend}, {self.local_world} per node), "
                f"rank 0 on {self.device}")

    def cpu_threads(self, asked: int) -> int:
        """Threads per process: processes on one node share its cores instead of each taking all."""
        if asked or not self.enabled:
            return asked
        return max(1, usable_cores() // self.local_world)

    # ------------------------------------------------------------ agreeing on values

    def sum(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks, bitwise the same on every rank (each adds the gathered values in rank
        order), so decisions taken on them (skip, stop, best checkpoint) never diverge."""
        if not self.enabled:
            return list(values)
        local = torch.tensor(values, dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.stack(parts).sum(0).tolist()

    def _broadcast(self, obj: object) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.file_group)
        return box[0]

    def on_main(self, fn: Callable[[], T], share_result: bool = True) -> T:
        """Rank 0 runs `fn` (file work: only it writes); the others wait for it and get its result,
        or raise its CairnError. Waiting here is what keeps a rank from reading a half-written file."""
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except CairnError as e:
                self._broadcast(("error", e.raw()))
                raise
            self._broadcast(("ok", result if share_result else None))
            return result
        status, value = cast(tuple[str, object], self._broadcast(None))
        if status == "error":
            raise SharedError(str(value))
        return cast(T, value)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs `fn` first (it fills a cache), then the others run it (and find the cache).
        All leave together, so the time the others spent does not count against the next
        collective's (short) timeout."""
        result = self.on_main(fn, share_result=False)
        if not self.is_main:
            result = fn()
        if self.enabled:
            dist.barrier(group=self.file_group)
        return result

    def gather_objects(self, obj: T) -> Optional[list[T]]:
        """Every rank's `obj`, on rank 0 (None elsewhere)."""
        if not self.enabled:
            return [obj]
        out: Optional[list[object]] = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.file_group)
        return cast(Optional[list[T]], out)

    def lockstep(self, batches: Iterable[dict], n: int, filler: dict) -> Iterator[dict]:
        """Exactly `n` batches: FSDP ranks must run the same number of forward passes (each one
        gathers parameters from all ranks), so a rank whose share ran out evaluates `filler`, a
        batch whose targets are all padding and count nothing."""
        count = 0
        for batch in batches:
            if count == n:
                return
            count += 1
            yield batch
        for _ in range(n - count):
            yield filler

    # ------------------------------------------------------------ the model

    def wrap(self, model: Transformer, precision: str) -> nn.Module:
        """The module the training step calls: DDP around the model, or the model itself after
        `fully_shard` (which changes it in place: its parameters become DTensor shards)."""
        if not self.enabled:
            return model
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # the position table is a constant: no need to broadcast the buffers before every forward
            newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            no_buffer_sync: dict[str, Any] = {"forward_sync_buffers" if newer else "broadcast_buffers": False}
            return DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if self.device.type == "cuda" and precision == "bf16":
            # compute in bf16, reduce gradients and keep the sharded master weights in float32
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks.children():  # one all-gather per block, freed after it: memory of one block
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, head
        return model

    @contextlib.contextmanager
    def grad_sync(self, wrapped: nn.Module, sync: bool) -> Iterator[None]:
        """Reduce gradients across ranks only on the last micro-step of an accumulated step."""
        if self.enabled and self.parallel == "ddp" and not sync:
            from torch.nn.parallel import DistributedDataParallel

            assert isinstance(wrapped, DistributedDataParallel)
            with wrapped.no_sync():
                yield
            return
        if self.enabled and self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            assert isinstance(wrapped, FSDPModule)
            wrapped.set_requires_gradient_sync(sync)
        yield

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> float:
        """Clip to the global gradient norm: DDP's gradients are already the averaged ones on
        every rank; FSDP's are DTensor shards, whose norm is reduced across ranks."""
        if not self.fsdp or not self.enabled:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor

        with_grads = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads if p.grad is not None], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm)
        return float(norm)

    # ------------------------------------------------------------ checkpoints

    def full_weights(self, model: Transformer) -> dict[str, torch.Tensor]:
        """The whole model's weights as `model.weights()` gives them (the file format of every
        checkpoint, whatever the world size); under FSDP gathered onto rank 0 (empty elsewhere)."""
        if not (self.enabled and self.fsdp):
            return model.weights()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        keep = model.weights().keys()  # a tied head is left out, as weights() does
        state = get_model_state_dict(model, options=_full_options())
        return {k: v for k, v in state.items() if k in keep and isinstance(v, torch.Tensor)}

    def load_full_weights(self, model: Transformer, weights: dict[str, torch.Tensor]) -> None:
        """Whole weights (as `model.weights()` gives them, on every rank) into the model (under FSDP
        into each rank's shards)."""
        if not (self.enabled and self.fsdp):
            model.load_weights(weights)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if model.cfg.tie_embeddings:
            weights = {**weights, "lm_head.weight": weights["wte.weight"]}
        set_model_state_dict(model, dict(weights), options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, model: nn.Module, optimizer: Optimizer) -> dict:
        """The optimizer state keyed by parameter names, not positions, and whole (gathered on rank
        0 under FSDP): one format that a single process, DDP and FSDP all load."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, _parts(optimizer), options=_full_options())

    def load_optimizer_state(self, model: nn.Module, optimizer: Optimizer, state: dict) -> None:
        """Every rank loads the whole state it read from the (shared) checkpoint and keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = _named_optimizer_state(state, model, optimizer)
        set_optimizer_state_dict(model, _parts(optimizer), state, options=StateDictOptions(full_state_dict=True))

    # ------------------------------------------------------------ failures

    def failure(self, e: BaseException) -> CairnError:
        """One line naming the rank and what went wrong. torchrun stops the other ranks when one
        exits with an error; a rank that only lost them says so instead of repeating their error."""
        where = f"rank {self.rank} of {self.world}"
        if isinstance(e, SharedError):
            return e
        if isinstance(e, CairnError):
            return CairnError(f"{where}: {e.raw()}")
        if _lost_contact(e):
            error = CairnError(f"{where} stopped: it lost contact with the other ranks ({_first_line(e)}); another "
                               "rank failed or was killed (see its message), or hung past "
                               f"system.dist_timeout_s = {self.timeout_s}s")
        else:
            traceback.print_exception(e, file=sys.stderr)  # a bug: its traceback is worth seeing
            error = CairnError(f"{where} failed: {type(e).__name__}: {_first_line(e)}")
        _record_for_torchrun(error)
        return error


def _lost_contact(e: BaseException) -> bool:
    """A collective that failed because a peer did: NCCL says so by type, gloo only in words."""
    words = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out")
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(w in str(e) for w in words))


def _first_line(e: BaseException) -> str:
    """The gist of an error: its first sentence, without the source location gloo puts first."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(e).__name__
    return text.split(". ")[0].rstrip(".") or type(e).__name__


def _record_for_torchrun(error: CairnError) -> None:
    """Write torchrun's error file, so its summary names this rank's message as the root cause."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    with contextlib.suppress(Exception):
        ErrorHandler().record_exception(error)


def _parts(optimizer: Optimizer) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
    """The torch optimizers behind cairn's optimizer (Muon + AdamW is two); torch's state-dict
    functions take them as a list and key the state of all of them by parameter name."""
    return optimizer.parts if isinstance(optimizer, MuonWithAdamW) else optimizer


def _full_options() -> StateDictOptions:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _named_optimizer_state(state: dict, model: nn.Module, optimizer: Optimizer) -> dict:
    """Checkpoints written before names were used key the state by position in the optimizer's
    groups (torch's own format): give each position its parameter's name."""
    positional = [p for g in state["param_groups"] for p in g["params"]]
    if all(isinstance(p, str) for p in positional):
        return state
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


@contextlib.contextmanager
def session(t: SystemConfig) -> Iterator[Dist]:
    """The process group for one training run, when torchrun started several processes.

    Every collective waits at most `t.dist_timeout_s` for the other ranks, so a rank that hangs
    brings the job down instead of freezing it; an error on one rank becomes a one-line
    CairnError naming the rank."""
    env = torchrun_env()
    if env is None or env["WORLD_SIZE"] == 1:
        if t.parallel == "fsdp" and env is None:
            logging.getLogger(__name__).info("parallel = fsdp shards a model across processes started by torchrun: "
                                             "training in this one process")
        yield Dist(device=pick_device(t.device))
        return
    device = _rank_device(t.device, env["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torch.distributed.nn.functional takes the default group as its functions' default argument when
    # it is first imported (DDP imports it, through torch._dynamo): imported after the group exists,
    # it would keep the group alive past its end (see _end)
    importlib.import_module("torch.distributed.nn.functional")

    dist.init_process_group(backend, timeout=timedelta(seconds=t.dist_timeout_s),
                            device_id=device if device.type == "cuda" else None)
    d = Dist(env["RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], device, t.parallel, t.dist_timeout_s)
    try:
        d.file_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(t.dist_timeout_s, FILE_WAIT_S)))
        yield d
        # all ranks leave together: one that tore its process group down while another still
        # finished its last work (rank 0 writing the stories) could abort the other's exit
        dist.barrier(group=d.file_group)
    except Exception as e:
        raise d.failure(e) from None
    _end(d)


def _end(d: Dist) -> None:
    """Tear the process groups down here, while Python is fully alive.

    `destroy_process_group` only drops torch's own references to the groups; a gloo group's
    backend (its worker threads, its TCP loop) stops when the last reference goes. A group that
    something else still referenced (this Dist; the run's DDP reducer, in a reference cycle) would
    be torn down during interpreter shutdown instead, where a gloo worker thread still freeing the
    tensors of a finished collective cannot take the GIL: the rank then aborts after its run has
    ended ("terminate called without an active exception"), now and then, on a busy machine."""
    d.file_group = None
    gc.collect()  # the run's reference cycles (the trainer, its DDP wrapper and reducer)
    dist.destroy_process_group()
