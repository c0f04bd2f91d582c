"""Rank 0 drives, the workers follow: rank 0 runs the whole engine (scheduler, sampling, detokenizing) and its runner
calls the model and the cache through `Remote`, which first broadcasts each call (its name and arguments: the step's
ForwardBatch, the hidden rows that need logits) to every worker; each worker makes the same call on its own shard
and cache (`serve`), so the collectives inside the model meet. Only rank 0 keeps the logits.

Workers are spawned processes on this machine (`spawn_workers`), or every rank is started by torchrun (multi-node:
ranks other than 0 enter `serve` inside `LLM()`, see `start_group`). A worker that dies closes its sockets: rank 0's
next collective fails, and the step raises `WorkerDied` naming the worker and its exit code; from then on the
group is out of step and every call raises it again. A worker whose rank 0 is gone exits."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.distributed as dist

from qwen35.cache.hybrid import HybridCache
from qwen35.config import ModelConfig
from qwen35.distributed.parallel import Comm, WorkerDied, init, torchrun_env
from qwen35.distributed.shard import ShardPlan
from qwen35.models.loader import load_model

logger = logging.getLogger(__name__)
_OBJECTS: dict[str, object] = {}  # a worker's own model, cache and state, by the names rank 0 calls them


def _worker_object(name: str):
    return _OBJECTS[name]


class WorkerGroup:
    """Rank 0's handle on the other ranks: sends calls, collects replies, notices deaths."""

    def __init__(self, comm: Comm, processes: list | None = None, cleanup=None):
        self.comm, self.processes, self._cleanup = comm, processes or [], cleanup
        self.broken: str | None = None
        self._closing = False

    @property
    def size(self) -> int:
        return self.comm.size

    def send(self, name: str, path: tuple, args: tuple = (), kwargs: dict | None = None, reply: bool = False):
        self._check()
        if self.comm.device.type == "cuda":  # a pickled CUDA tensor would come back on rank 0's GPU: go by the host
            args, kwargs = move(args, torch.device("cpu")), move(kwargs, torch.device("cpu"))
        try:
            self.comm.broadcast((name, path, args, kwargs or {}, reply))
        except Exception as e:
            self.fail(e)

    def replies(self, what: str) -> None:
        """After a call sent with reply=True: every worker's error, raised here as one."""
        try:
            errors = [e for e in self.comm.gather(None)[1:] if e]
        except Exception as e:
            self.fail(e)
        if errors:
            raise RuntimeError(f"{what} failed on a tensor-parallel worker: " + "; ".join(errors))

    def fail(self, cause: BaseException):
        """The group is out of step (a worker died, or a call failed on rank 0 while the workers made it)."""
        for p in self.processes:
            p.join(0.5)  # a worker that just died: its exit code
        self.broken = self._dead() or f"a tensor-parallel call failed: {type(cause).__name__}: {cause}"
        raise WorkerDied(f"tensor parallelism stopped: {self.broken}. The engine cannot continue; restart it") \
            from cause

    def watch(self, on_death) -> None:
        """Call on_death(message) from a thread as soon as a spawned worker exits (a server stops then, even idle)."""
        if not self.processes:
            return

        def wait():
            for sentinel in multiprocessing.connection.wait([p.sentinel for p in self.processes]):
                next(p for p in self.processes if p.sentinel == sentinel).join(5)  # its exit code
            if not self._closing:
                self.broken = self.broken or self._dead()
                on_death(f"tensor parallelism stopped: {self.broken}")

        threading.Thread(target=wait, name="qwen35-tp-watch", daemon=True).start()

    def _dead(self) -> str:
        return "; ".join(f"worker {r} (pid {p.pid}) exited with code {p.exitcode}"
                         for r, p in enumerate(self.processes, 1) if p.exitcode is not None)

    def describe(self) -> str:
        pids = ", ".join(str(p.pid) for p in self.processes)
        return f"{self.size} ranks" + (f" (worker pids {pids})" if pids else " (torchrun)")

    def _check(self) -> None:
        if self.broken:
            raise WorkerDied(f"tensor parallelism stopped earlier: {self.broken}. The engine cannot continue; "
                             "restart it")

    def close(self) -> None:
        self._closing = True
        if not self.broken:
            try:
                self.comm.broadcast(None)
            except Exception:  # a worker already gone: nothing left to tell
                pass
        for p in self.processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.comm.close()
        if self._cleanup:
            self._cleanup()


class Remote:
    """Rank 0's face of an object each worker holds its own copy or shard of (`name`): a call on it, or on any
    callable attribute of it (a method, a submodule), is broadcast, then made here. Plain attributes are read
    here. Passed as an argument, it stands for the worker's own object."""

    def __init__(self, group: WorkerGroup, name: str, target, path: tuple = ()):
        self._group, self._name, self._target, self._path = group, name, target, path

    def __getattr__(self, attr: str):
        value = getattr(self._target, attr)
        return Remote(self._group, self._name, value, self._path + (attr,)) if callable(value) else value

    def __call__(self, *args, **kwargs):
        self._group.send(self._name, self._path, args, kwargs)
        try:
            return self._target(*[_here(a) for a in args], **{k: _here(v) for k, v in kwargs.items()})
        except Exception as e:
            self._group.fail(e)

    def __reduce__(self):
        if self._path:
            raise TypeError("only a whole remote object can be passed to a remote call")
        return _worker_object, (self._name,)


def move(obj, device: torch.device):
    """obj with every tensor inside (tuples, lists, dicts, dataclasses such as ForwardBatch) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _here(value):
    return value._target if isinstance(value, Remote) else value


class Worker:
    """What a worker does besides following calls: load its shard, allocate its cache."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def load(self, path: str, load_kwargs: dict, expert_parallel: bool) -> None:
        plan = ShardPlan(ModelConfig.from_dir(path).text, self.comm.rank, self.comm.size, expert_parallel)
        _OBJECTS["model"] = load_model(path, **load_kwargs, device=self.comm.device, vision=False, progress=False,
                                       shard=plan, comm=self.comm)[0]

    def make_cache(self, mtp: bool, num_blocks: int, block_size: int, num_slots: int) -> None:
        model = _OBJECTS["model"]
        _OBJECTS["cache"] = HybridCache(model.cache_spec(mtp=mtp), num_blocks, block_size, num_slots, model.dtype,
                                        self.comm.device)


def serve(comm: Comm) -> None:
    """A worker's life: make rank 0's calls until it says stop (None) or is gone."""
    _OBJECTS["worker"] = Worker(comm)
    while True:
        try:
            msg = comm.broadcast()
        except Exception:  # rank 0 is gone
            return
        if msg is None:
            return
        name, path, args, kwargs, reply = msg
        if comm.device.type == "cuda":
            args, kwargs = move(args, comm.device), move(kwargs, comm.device)
        target = _OBJECTS[name]
        for attr in path:
            target = getattr(target, attr)
        error = None
        try:
            with torch.inference_mode():
                target(*args, **kwargs)
        except Exception as e:
            if not reply:
                raise  # the group is out of step: dying is what tells rank 0
            error = f"rank {comm.rank}: {type(e).__name__}: {e}"
        if reply:
            comm.gather(error)


def _spawned(rank: int, size: int, store_path: str, device: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    _share_cores(torch.device(device), size)
    try:
        store = dist.FileStore(store_path, size)
        store.set(f"ready/{rank}", "1")  # rank 0 joins once every worker got this far
        comm = init(rank, size, _rank_device(torch.device(device), rank), store=store)
        serve(comm)
    except Exception:
        traceback.print_exc()
        sys.stderr.write(f"qwen35: tensor-parallel worker {rank} failed (above)\n")
        sys.exit(1)
    os._exit(0)  # skip interpreter teardown: the group may be half closed


def _rank_device(device: torch.device, rank: int) -> torch.device:
    """On GPUs, local rank r uses cuda:r (from the device given, e.g. cuda:0 or cuda)."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def start_group(size: int, device: torch.device) -> WorkerGroup:
    """Rank 0's group of `size` ranks: under torchrun, join it (ranks other than 0 serve here and end the process
    when rank 0 stops); else spawn size - 1 local worker processes."""
    env = torchrun_env()
    if env is not None:
        rank, world, local_rank = env
        if world != size:
            raise ValueError(f"tensor_parallel_size is {size} but torchrun started {world} processes "
                             "(WORLD_SIZE); they must be equal")
        comm = init(rank, world, _rank_device(device, local_rank))
        if rank != 0:
            serve(comm)
            comm.close()
            sys.exit(0)
        return WorkerGroup(comm)
    return spawn_workers(size, device)


def _share_cores(device: torch.device, size: int) -> int:
    """Ranks on one CPU machine split its cores: N ranks at full width would each wait on the others' threads.
    Returns the thread count before (rank 0's is restored when its group closes)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    return before


def spawn_workers(size: int, device: torch.device, target=_spawned) -> WorkerGroup:
    """Start size - 1 local workers (target: their main function, (rank, size, store path, device)) and join them
    in a group over a file store. Rank 0 joins only once every worker has said it is ready (a key in the store),
    watching the workers meanwhile: one that exits before is a WorkerDied at once, not a wait for the group's
    timeout."""
    fd, path = tempfile.mkstemp(prefix="qwen35-tp-")
    os.close(fd)
    os.unlink(path)  # the store creates it; a stale one would hold an old group's keys
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=target, args=(r, size, path, str(device)), daemon=True,
                             name=f"qwen35-tp-worker-{r}") for r in range(1, size)]
    for p in processes:
        p.start()
    threads = _share_cores(device, size)  # rank 0 too

    def cleanup():
        torch.set_num_threads(threads)
        if os.path.exists(path):
            os.unlink(path)

    try:
        store = dist.FileStore(path, size)
        ready = [f"ready/{r}" for r in range(1, size)]
        while not store.check(ready):
            if dead := [(r, p) for r, p in enumerate(processes, 1) if p.exitcode is not None]:
                raise WorkerDied("; ".join(f"tensor-parallel worker {r} (pid {p.pid}) exited with code {p.exitcode} "
                                           "before joining the group" for r, p in dead) + " (its error is above)")
            time.sleep(0.05)
        comm = init(0, size, _rank_device(device, 0), store=store)
    except Exception as e:
        for p in processes:
            p.kill()
        cleanup()
        raise e if isinstance(e, WorkerDied) else WorkerDied(f"the tensor-parallel workers did not join: {e}") from e
    return WorkerGroup(comm, processes, cleanup)
