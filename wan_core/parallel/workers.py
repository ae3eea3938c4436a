"""A persistent group of worker processes, one per GPU, that sample for a caller (the ComfyUI node).

The caller process (ComfyUI) starts the group once: each worker joins a process group (NCCL on
GPUs, gloo on CPUs, rendezvous through a file, so no port is fixed), loads the experts itself
straight to its GPU, sets them up for Ulysses / CFG-parallel / FSDP (`parallelize`) and waits.
Each `run` sends every worker the same job (noise, text embeddings, sampler settings) over its
own local channel, a socket pair shared with no other process; rank 0 reports every step and
returns the latent. The models stay loaded for the next prompt.

- Progress: a ("progress", step, total) message after every step, passed to `callback`.
- Interrupt: while waiting, the caller polls `should_stop`; when it says stop (or `callback`
  raises), every worker is told, the ranks agree after the step in progress (`any_rank`), and
  `run` raises `GenerationInterrupted`; the group stays up.
- A worker that dies (killed, out of memory, a crash): its channel closes, the caller ends every
  other worker, reaps them all and raises `WorkerGroupError` saying which one died and how; the
  next `run` needs a new group. Workers also end themselves when the caller dies (their channel
  closes), so no orphan keeps a GPU.
- `close()` (also at interpreter exit) asks the workers to leave, and ends those that do not.

The worker side is this module's `worker_main`, run as `python -m wan_core.parallel.workers FD`.
"""
from __future__ import annotations

import os
import pickle
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from wan_core.parallel.groups import ParallelConfig

READY_TIMEOUT_S = 900.0  # loading two 14B experts from a slow disk
STEP_TIMEOUT_S = 1800.0  # no step of any supported size takes this long
STOP_TIMEOUT_S = 20.0


def _send(channel: Connection, message: Any) -> None:
    # plain pickle: tensors travel by value (multiprocessing's pickler would share their memory
    # through its own server, which needs processes it started itself)
    channel.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(channel: Connection) -> Any:
    return pickle.loads(channel.recv_bytes())


class WorkerGroupError(RuntimeError):
    """A worker failed or died; the whole group has been stopped."""


@dataclass(frozen=True)
class ExpertSource:
    """How a worker loads one DiT: `wan_core.load_dit(path, dtype=..., quant=...)`, then the
    attention backend and optional block compilation."""

    path: str
    dtype: str = "bfloat16"
    quant: Optional[str] = None
    attention: str = "sdpa"
    compile_blocks: bool = False

    def load(self, device: torch.device):
        from wan_core.loading import load_dit

        model = load_dit(self.path, dtype=getattr(torch, self.dtype), device=device, quant=self.quant)
        model.set_attention_backend(self.attention)
        if self.compile_blocks:
            model.compile_blocks()
        return model


@dataclass(frozen=True)
class GroupSpec:
    """What a group runs: its devices ("cuda:1", or "cpu" for gloo workers), the DiTs each
    worker loads, and how the ranks share the work (its world size is len(devices))."""

    devices: tuple[str, ...]
    experts: tuple[ExpertSource, ...]
    cfg_parallel: bool = False
    dit_fsdp: bool = False

    @property
    def config(self) -> ParallelConfig:
        size = len(self.devices) // (2 if self.cfg_parallel else 1)
        return ParallelConfig(ulysses_size=max(size, 1), cfg_parallel=self.cfg_parallel, dit_fsdp=self.dit_fsdp)


@dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen
    channel: Connection
    messages: list = field(default_factory=list)


def _describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _end_processes(workers: Sequence[_Worker], store_dir: str, grace_s: float) -> None:
    """Ask, then make, every worker leave; reap them all; remove the rendezvous folder."""
    for worker in workers:
        try:
            _send(worker.channel, ("shutdown",))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace_s
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        worker.channel.close()
    shutil.rmtree(store_dir, ignore_errors=True)


class WorkerGroup:
    """The worker processes of one `GroupSpec`; `run` samples, `close` stops them."""

    def __init__(self, spec: GroupSpec, *, ready_timeout: float = READY_TIMEOUT_S):
        if not spec.devices:
            raise ValueError("a worker group needs at least one device")
        if not spec.experts:
            raise ValueError("a worker group needs the DiT(s) to load")
        self.spec = spec
        self._store_dir = tempfile.mkdtemp(prefix="wan22-workers-")
        self._workers: list[_Worker] = []
        self.closed = False
        self._finalizer = weakref.finalize(self, _end_processes, self._workers, self._store_dir, STOP_TIMEOUT_S)
        try:
            for rank, device in enumerate(spec.devices):
                self._workers.append(self._spawn(rank, device))
            self._wait_for_all("ready", ready_timeout, "loading the models")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _spawn(self, rank: int, device: str) -> _Worker:
        mine, theirs = socket.socketpair()
        env = dict(os.environ)  # keeps NCCL_* and the like
        root = str(Path(__file__).resolve().parents[2])  # the folder holding wan_core
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        if device.startswith("cuda"):
            visible = env.get("CUDA_VISIBLE_DEVICES")
            index = int(device.partition(":")[2] or 0)
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
        with theirs:
            process = subprocess.Popen([sys.executable, "-m", "wan_core.parallel.workers", str(theirs.fileno())],
                                       pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        channel = Connection(mine.detach())
        store = os.path.join(self._store_dir, "rendezvous")
        _send(channel, {"rank": rank, "world_size": len(self.spec.devices), "device": device, "store": store,
                      "spec": self.spec})
        return _Worker(rank, device, process, channel)

    # --- waiting on the workers -------------------------------------------------------------

    def _receive(self, timeout: float) -> list[tuple[_Worker, tuple]]:
        """Messages that arrive within `timeout` s; a closed channel means a dead worker."""
        ready = wait([w.channel for w in self._workers], timeout=timeout)
        received = []
        for worker in self._workers:
            if worker.channel in ready:
                try:
                    received.append((worker, _recv(worker.channel)))
                except (EOFError, OSError):
                    self._fail_dead(worker)
        return received

    def _fail_dead(self, worker: _Worker) -> None:
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.close(grace_s=0)  # the others wait in a collective that will not complete
        raise WorkerGroupError(
            f"worker {worker.rank} of {len(self._workers)} ({worker.device}, pid {worker.process.pid}) ended with "
            f"{_describe_exit(code)}; the worker group was stopped (all its processes ended). Queue the prompt again "
            f"to start a new group; if it keeps happening, look at that worker's output above (out of memory?)")

    def _fail_error(self, worker: _Worker, text: str) -> None:
        self.close(grace_s=0)
        raise WorkerGroupError(f"worker {worker.rank} ({worker.device}) failed, so the worker group was stopped: {text}")

    def _wait_for_all(self, kind: str, timeout: float, doing: str) -> list:
        """The payloads of one `kind` message from every worker, in rank order."""
        payloads: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(payloads) < len(self._workers):
            if time.monotonic() > deadline:
                self.close()
                raise WorkerGroupError(f"the workers did not finish {doing} within {timeout:.0f} s; the group was stopped")
            for worker, message in self._receive(0.2):
                if message[0] == "error":
                    self._fail_error(worker, message[1])
                if message[0] == kind:
                    payloads[worker.rank] = message[1:]
        return [payloads[rank] for rank in range(len(self._workers))]

    # --- running -------------------------------------------------------------------------

    def run(self, job: dict, *, callback: Optional[Callable[[int, int], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None, step_timeout: float = STEP_TIMEOUT_S) -> torch.Tensor:
        """Sample one job on every worker: `job` holds `wan_core.sampling.sample`'s arguments
        (tensors on the CPU) and "experts", indices into the spec's experts (one, or high and
        low noise). Returns the latent (on the CPU). Raises GenerationInterrupted when stopped."""
        from wan_core.pipeline import GenerationInterrupted

        if self.closed:
            raise WorkerGroupError("this worker group was stopped; start a new one")
        for worker in self._workers:
            _send(worker.channel, ("job", job))
        finished: dict[int, tuple] = {}
        progress = (0, 0)
        stopping: Optional[BaseException] = None
        last_news = time.monotonic()
        while len(finished) < len(self._workers):
            if stopping is None and should_stop is not None and should_stop():
                stopping = GenerationInterrupted(f"generation interrupted during step {progress[0] + 1}")
                self._tell_all(("stop",))
            if time.monotonic() - last_news > (STOP_TIMEOUT_S if stopping is not None else step_timeout):
                self.close()
                raise WorkerGroupError("the workers stopped answering (no step finished in time); the group was stopped")
            for worker, message in self._receive(0.1):
                last_news = time.monotonic()
                if message[0] == "error":
                    self._fail_error(worker, message[1])
                elif message[0] == "progress":
                    progress = message[1:]
                    if callback is None or stopping is not None:
                        continue
                    try:
                        callback(*progress)
                    except BaseException as error:  # the host's interrupt: stop the workers, then re-raise
                        stopping = error
                        self._tell_all(("stop",))
                elif message[0] in ("done", "interrupted"):
                    finished[worker.rank] = message
        if stopping is not None:  # the workers stopped after the step in progress, or had just finished
            if isinstance(stopping, GenerationInterrupted):
                raise GenerationInterrupted(f"generation interrupted after step {progress[0]} of {progress[1]}")
            raise stopping
        return finished[0][1]

    def _tell_all(self, message: tuple) -> None:
        for worker in self._workers:
            try:
                _send(worker.channel, message)
            except OSError:
                pass  # a dead worker: its closed channel is reported by _receive

    def close(self, grace_s: float = STOP_TIMEOUT_S) -> None:
        """Stop every worker (asked to leave, ended after `grace_s`) and reap them; idempotent."""
        if self._finalizer.detach() is not None:
            _end_processes(self._workers, self._store_dir, grace_s)
        self.closed = True


# --- the worker process ------------------------------------------------------------------------

class _Stopped(Exception):
    pass


def _read_channel(channel: Connection, jobs: "queue.Queue", stop: threading.Event) -> None:
    """The worker's ear: "stop" takes effect at once, everything else queues for the main loop.
    A closed channel means the caller is gone: leave at once (os._exit skips a hung collective)."""
    while True:
        try:
            message = _recv(channel)
        except (EOFError, OSError):
            os._exit(3)
        if message[0] == "stop":
            stop.set()
        else:
            jobs.put(message)


def _run_job(job: dict, experts: list, device: torch.device, stop: threading.Event, channel: Connection,
             rank: int) -> None:
    from wan_core.parallel.launch import any_rank
    from wan_core.sampling import sample

    def on_device(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, list):
            return [on_device(v) for v in value]
        return value

    agreed_stop = any_rank(stop.is_set, device)

    def on_step(step: int, total: int, _latent: torch.Tensor) -> None:
        if rank == 0:
            _send(channel, ("progress", step, total))
        if agreed_stop():
            raise _Stopped(step)

    chosen = [experts[i] for i in job["experts"]]
    kwargs = {k: on_device(v) for k, v in job["sample"].items()}
    try:
        latent = sample(chosen[0] if len(chosen) == 1 else tuple(chosen), callback=on_step, **kwargs)
    except _Stopped as stopped:
        _send(channel, ("interrupted", stopped.args[0]))
        return
    _send(channel, ("done", latent.cpu() if rank == 0 else None))


def worker_main(fd: int) -> None:
    """One worker: join the group, load the experts, then run jobs until told to shut down."""
    import torch.distributed as dist

    channel = Connection(fd)
    setup = _recv(channel)
    rank, spec = setup["rank"], setup["spec"]
    jobs: "queue.Queue" = queue.Queue()
    stop = threading.Event()
    threading.Thread(target=_read_channel, args=(channel, jobs, stop), daemon=True).start()
    try:
        device = torch.device(setup["device"])
        if device.type == "cuda":
            device = torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES shows this worker its one GPU
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // setup["world_size"]))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{setup['store']}",
                                rank=rank, world_size=setup["world_size"])
        from wan_core.parallel import init_groups, parallelize

        groups = init_groups(spec.config, device)
        # with FSDP the weights are memory-mapped on the CPU and sharded onto the GPU block by block
        load_to = torch.device("cpu") if spec.dit_fsdp else device
        experts = parallelize([source.load(load_to) for source in spec.experts], groups)
        _send(channel, ("ready", rank))
        while True:
            message = jobs.get()
            if message[0] == "shutdown":
                break
            stop.clear()
            with torch.no_grad():
                _run_job(message[1], experts, device, stop, channel, rank)
    except (ValueError, TypeError, FileNotFoundError) as error:  # wan_core's own clear errors: the message says it all
        _send(channel, ("error", str(error)))
        sys.exit(1)
    except BaseException:
        _send(channel, ("error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from wan_core.parallel.workers import worker_main as _main  # this module under its own name, not __main__

    _main(int(sys.argv[1]))
