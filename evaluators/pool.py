"""Scoring a population on Ray actors that each hold one model: the `Evaluator` for many devices.

- `EvaluatorWorker` is the actor: it loads the model from its path inside the actor (weights
  never travel through the object store) and wraps one `ModelEvaluator`.
- `evaluators.workers.plan_workers` decides how many actors and what each asks of Ray (a GPU,
  several GPUs of one node, or CPU threads); `start_actors` starts them.
- `RayEvaluatorPool` implements `Evaluator` over actor handles. Like Ray's `util/actor_pool.py`
  it never knows the actor's class: it only calls `ready()`, `evaluate(population, tokens)`,
  `block_influence()` and `units()`.
- `open_evaluator` is what the search uses: it picks in-process or Ray, starts what it needs and
  shuts down only what it started.

Faults: an actor that dies while it holds a chunk (killed, out of memory, node lost) is restarted
by Ray (`max_restarts`, which loads the model again) and the chunk goes to the next idle actor; an
actor that holds a chunk longer than `chunk_timeout` (a hung GPU) is killed, restarted and its
chunk resubmitted the same way; an actor out of GPU memory retries with smaller batches itself
(`ModelEvaluator`) and, failing that, says so; an actor that cannot be placed raises
TimeoutError after `start_timeout` instead of waiting forever.
"""
from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from pathlib import Path
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, NoReturn, Sequence

# A local, single-user Ray needs neither usage reporting nor token authentication; without
# these Ray prints a warning about each at every start. A user's own setting wins.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402
from ray.actor import ActorHandle
from ray.exceptions import ActorUnavailableError, GetTimeoutError, OutOfMemoryError, RayActorError, RayTaskError

from chromosomes import to_string, validate
from chromosomes.width import Unit
from evaluators.config import EvaluatorConfig
from evaluators.fitness import DeviceMemoryError, Evaluator, Fitness, ModelEvaluator
from evaluators.models import ModelLoadError, model_folder
from evaluators.workers import AUTO, Cluster, WorkerConfig, WorkerPlan, plan_workers

logger = logging.getLogger(__name__)

# Settings read from the environment that actors must share with the driver that started them.
FORWARDED_ENV = ("GAPRUNE_CACHE", "GAPRUNE_DATA_DIR", "HF_HOME")
PROBE_PAUSE = 0.2  # seconds between asking a restarting actor whether it is ready


class PoolError(RuntimeError):
    """The pool cannot start or cannot finish a generation; the message says why."""


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------

class EvaluatorWorker:
    """One `ModelEvaluator` inside one Ray actor.

    Ray runs `__init__` again whenever it restarts the actor, so a restart reloads the model
    from its path; nothing but chromosomes and fitness values crosses the object store.
    """

    def __init__(self, config: EvaluatorConfig):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one loading bar per actor would flood the driver's log
        self._failure: Exception | None = None
        try:
            self._evaluator: ModelEvaluator | None = ModelEvaluator(config)
        except (ModelLoadError, ValueError) as error:
            # An exception escaping __init__ reaches the driver only as text inside ActorDiedError.
            # Keeping the user's mistake (a missing text file, a bad setting) and raising it from
            # ready() lets the driver re-raise it as itself, with its own clear message.
            self._evaluator, self._failure = None, error

    def ready(self) -> dict[str, Any]:
        """The evaluator's description and where it runs; raises what stopped the model loading."""
        if self._failure is not None:
            raise self._failure
        return {"description": self._loaded().describe(), "devices": self.devices()}

    def devices(self) -> dict[str, Any]:
        """What Ray gave this actor: its GPU ids (CUDA_VISIBLE_DEVICES follows them) and torch's view."""
        model = self._loaded().model
        return {
            "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
        }

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        return self._loaded().evaluate(population, tokens)

    def block_influence(self) -> list[float]:
        return self._loaded().block_influence()

    def units(self) -> list[Unit]:
        return self._loaded().units()

    def export(self, genes: Sequence[object], folder: str, files: dict[str, str]) -> str:
        return self._loaded().export(genes, folder, files)

    def _loaded(self) -> ModelEvaluator:
        if self._evaluator is None:
            raise PoolError(f"this actor holds no model: {self._failure}")
        return self._evaluator


# ---------------------------------------------------------------------------------------------
# Starting the actors (how many and what each asks of Ray: evaluators.workers)
# ---------------------------------------------------------------------------------------------

def start_actors(config: EvaluatorConfig, plan: WorkerPlan, worker: type = EvaluatorWorker,
                 max_restarts: int = 3) -> list[ActorHandle]:
    """Create the actors (they load their models in the background; the pool waits for them)."""
    actor_config = replace(config, threads=plan.threads, device=plan.device)
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    options = dict(num_gpus=plan.gpus, num_cpus=plan.threads, max_restarts=max_restarts,
                   # Retrying is the pool's job: it resubmits a lost chunk to whichever actor is idle.
                   max_task_retries=0, runtime_env={"env_vars": env} if env else None)
    return [ray.remote(worker).options(**options).remote(actor_config) for _ in range(plan.actors)]


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------

@dataclass
class GenerationReport:
    """How the last population was scored: for logs, benchmarks and tests."""

    chunks: int
    finished: list[int] = field(default_factory=list)  # chunk indices, in the order they finished
    resubmitted: int = 0  # chunks sent again because their actor died (timed-out ones included)
    timed_out: int = 0  # chunks whose actor was killed for holding them past chunk_timeout
    lost_actors: int = 0  # actors that did not come back and were dropped


def contiguous_chunks(order: Sequence[int], count: int) -> list[list[int]]:
    """`order` cut into `count` consecutive runs whose sizes differ by at most one."""
    size, extra = divmod(len(order), count)
    chunks, start = [], 0
    for index in range(count):
        end = start + size + (index < extra)
        chunks.append(list(order[start:end]))
        start = end
    return chunks


def _reraise_remote(error: RayTaskError) -> NoReturn:
    """A ValueError or ModelLoadError raised in an actor (a chromosome or token count it refuses,
    a missing text) is the caller's mistake, and a DeviceMemoryError says what to change: raise
    it as itself. Anything else is a bug: keep Ray's error, whose message carries the actor's
    traceback."""
    if isinstance(error.cause, (ValueError, ModelLoadError, DeviceMemoryError)):
        raise error.cause from None
    raise error


class RayEvaluatorPool:
    """The `Evaluator` interface over Ray actors that hold identical models.

    A population is sorted by genes and cut into contiguous chunks, so that neighbours inside a
    chunk share their leading layers' computation; idle actors take the next chunk, and results
    are put back by index whatever order the chunks finish in.
    """

    def __init__(self, actors: Sequence[ActorHandle], start_timeout: float = 300.0,
                 chunks_per_actor: int = 2, max_chunk_attempts: int = 3, chunk_timeout: float | None = None):
        if not actors:
            raise ValueError("a pool needs at least one actor")
        if chunks_per_actor < 1 or max_chunk_attempts < 1:
            raise ValueError("chunks_per_actor and max_chunk_attempts must be at least 1")
        if chunk_timeout is not None and not chunk_timeout > 0:
            raise ValueError(f"chunk_timeout must be a positive number of seconds, got {chunk_timeout!r}")
        self._actors = list(actors)
        self.start_timeout = start_timeout
        self.chunk_timeout = chunk_timeout  # None: a chunk may take as long as it takes
        self.chunks_per_actor = chunks_per_actor
        self.max_chunk_attempts = max_chunk_attempts
        self.last_generation: GenerationReport | None = None
        try:
            reports = self._wait_until_ready(start_timeout)
        except BaseException:
            self.close()
            raise
        self._description: dict[str, Any] = reports[0]["description"]
        self.num_layers: int = self._description["num_layers"]
        self.placements: list[dict[str, Any]] = [report["devices"] for report in reports]

    @property
    def parallelism(self) -> int:
        """Chromosomes scored at once: one per live actor."""
        return len(self._actors)

    def describe(self) -> dict[str, Any]:
        """The actors' own description: identical to an in-process evaluator's with the same config,
        so that a run may be resumed with other --workers."""
        return dict(self._description)

    def close(self) -> None:
        """Stop the actors (for good: no restart). Safe to call twice or after Ray has stopped."""
        if ray.is_initialized():
            for actor in self._actors:
                ray.kill(actor, no_restart=True)
        self._actors = []

    def block_influence(self) -> list[float]:
        return self._ask_one("block_influence")

    def units(self) -> list[Unit]:
        return self._ask_one("units")

    def export(self, genes: Sequence[object], folder: str, files: dict[str, str]) -> str:
        """One actor writes it, on its own machine: on a cluster, give --out a path every node shares."""
        return self._ask_one("export", validate(genes, self.num_layers), str(Path(folder).resolve()), files)

    def _ask_one(self, method: str, *args: Any) -> Any:
        """A question about the dense model, so one actor answers; one that died, is restarting or
        does not answer within the chunk timeout (or, without one, the start timeout) passes it on."""
        timeout = self.chunk_timeout or self.start_timeout
        for actor in self._actors:
            try:
                return ray.get(getattr(actor, method).remote(*args), timeout=timeout)
            except GetTimeoutError:
                logger.warning("an evaluation actor did not answer %s within %g s; asking the next", method, timeout)
                ray.kill(actor, no_restart=False)  # whatever it is stuck in, Ray restarts it
            except (RayActorError, ActorUnavailableError):
                continue
            except RayTaskError as error:
                _reraise_remote(error)
        raise PoolError(f"no actor could answer {method}: every actor died, is restarting or took over {timeout:g} s")

    def evaluate(self, population: Sequence[Sequence[int]], tokens: int | None = None) -> list[Fitness]:
        genes = [validate(individual, self.num_layers) for individual in population]  # refuse before any work
        if not genes:
            return []
        keys = [to_string(individual) for individual in genes]  # width genes do not compare with ints
        order = sorted(range(len(genes)), key=keys.__getitem__)  # shared leading layers share a chunk
        chunks = contiguous_chunks(order, min(len(genes), len(self._actors) * self.chunks_per_actor))
        report = GenerationReport(len(chunks))
        results: list[Fitness | None] = [None] * len(genes)
        todo, idle = deque(range(len(chunks))), deque(self._actors)
        attempts: Counter[int] = Counter()
        running: dict[ray.ObjectRef, tuple[ActorHandle, int, float]] = {}  # -> (actor, chunk, deadline)
        recovering: dict[ray.ObjectRef, tuple[ActorHandle, float]] = {}  # ready() probe -> (actor, deadline)
        killed: set[ray.ObjectRef] = set()  # chunks whose actor was killed for taking too long
        while todo or running:
            # Phase 1: every idle actor takes the next chunk.
            while todo and idle:
                actor, index = idle.popleft(), todo.popleft()
                attempts[index] += 1
                deadline = time.monotonic() + self.chunk_timeout if self.chunk_timeout else math.inf
                running[actor.evaluate.remote([genes[i] for i in chunks[index]], tokens)] = (actor, index, deadline)
            if not running and not recovering:
                raise PoolError(f"every evaluation actor has died; {len(todo)} of {len(chunks)} chunks are unscored")
            # Phase 2: wait for a chunk to finish, a restarted actor to be ready, or a deadline to pass.
            done, _ = ray.wait([*running, *recovering], num_returns=1, timeout=self._until_first(running, recovering))
            for ref in done:
                if ref in recovering:
                    self._welcome_back(ref, recovering, idle, report)
                    continue
                actor, index, _ = running.pop(ref)
                try:
                    fitness = ray.get(ref)
                except (RayActorError, OutOfMemoryError) as error:
                    # The actor died while it held this chunk (killed, out of memory, node lost,
                    # or killed below for taking too long). Ray 2.60 raises ActorUnavailableError
                    # ("the actor was restarted") when it restarts the actor and ActorDiedError
                    # when the actor is gone; either way the chunk's results are lost, so it goes
                    # back first in line, and the actor gets a ready() probe that answers once Ray
                    # has restarted it (model loaded again).
                    cause = (f"took over {self.chunk_timeout:g} s (--chunk-timeout)" if ref in killed
                             else f"lost its actor (out of memory?): {error}")
                    if attempts[index] >= self.max_chunk_attempts:
                        raise PoolError(f"a chunk of {len(chunks[index])} chromosomes failed {attempts[index]} times; "
                                        f"the last time it {cause}") from error
                    logger.warning("a chunk of %d chromosomes %s; scoring it again", len(chunks[index]), cause)
                    todo.appendleft(index)
                    report.resubmitted += 1
                    recovering[actor.ready.remote()] = (actor, time.monotonic() + self.start_timeout)
                except RayTaskError as error:
                    _reraise_remote(error)
                else:
                    for i, value in zip(chunks[index], fitness):
                        results[i] = value
                    report.finished.append(index)
                    idle.append(actor)
            # Phase 3: a chunk past its deadline has its actor killed (Ray restarts it, and the
            # chunk comes back through phase 2 as lost); an actor that has not come back within
            # the start timeout is dropped.
            now = time.monotonic()
            for ref, (actor, index, deadline) in list(running.items()):
                if now > deadline:
                    ray.kill(actor, no_restart=False)
                    running[ref] = (actor, index, math.inf)
                    killed.add(ref)
                    report.timed_out += 1
            for ref in [ref for ref, (_, deadline) in recovering.items() if now > deadline]:
                self._drop(recovering.pop(ref)[0], report, f"not ready {self.start_timeout:.0f} s after it died")
        self.last_generation = report
        return results  # type: ignore[return-value]

    # -- helpers of evaluate --------------------------------------------------------------------

    @staticmethod
    def _until_first(running: dict[ray.ObjectRef, tuple[ActorHandle, int, float]],
                     recovering: dict[ray.ObjectRef, tuple[ActorHandle, float]]) -> float | None:
        """Seconds until the next deadline; None (wait as long as it takes: Ray reports an actor's
        death itself) when there is none."""
        deadlines = [deadline for *_, deadline in running.values()] + [deadline for _, deadline in recovering.values()]
        first = min(deadlines, default=math.inf)
        return None if first == math.inf else max(0.0, first - time.monotonic())

    def _welcome_back(self, probe: ray.ObjectRef, recovering: dict, idle: deque, report: GenerationReport) -> None:
        actor, deadline = recovering.pop(probe)
        try:
            ray.get(probe)
        except ActorUnavailableError:
            # The probe reached the actor while Ray was still restarting it: ask again a moment
            # later (the pause keeps this from spinning), until its deadline passes.
            time.sleep(PROBE_PAUSE)
            recovering[actor.ready.remote()] = (actor, deadline)
        except (RayActorError, RayTaskError) as error:  # out of restarts, or the model no longer loads
            self._drop(actor, report, str(error).splitlines()[0])
        else:
            idle.append(actor)

    def _drop(self, actor: ActorHandle, report: GenerationReport, reason: str) -> None:
        logger.warning("dropping an evaluation actor (%s); %d remain", reason, len(self._actors) - 1)
        ray.kill(actor, no_restart=True)
        self._actors.remove(actor)
        report.lost_actors += 1

    # -- start-up -------------------------------------------------------------------------------

    def _wait_until_ready(self, timeout: float) -> list[dict[str, Any]]:
        probes = [actor.ready.remote() for actor in self._actors]
        done, pending = ray.wait(probes, num_returns=len(probes), timeout=timeout)
        if pending:
            cluster, free = ray.cluster_resources(), ray.available_resources()
            have = ", ".join(f"{free.get(key, 0):g} of {cluster.get(key, 0):g} {key}s free" for key in ("GPU", "CPU"))
            raise TimeoutError(
                f"{len(pending)} of {len(probes)} evaluation actors did not start within {timeout:g} s: "
                f"Ray could not place them ({have}) or they are still loading the model. Use fewer "
                "--workers, free the cluster, join one that has the devices (--ray-address), or allow more time")
        try:
            return ray.get(probes)
        except RayTaskError as error:
            _reraise_remote(error)
        except RayActorError as error:
            raise PoolError(f"an evaluation actor died while loading the model: {_last_line(error)}") from error


def _last_line(error: BaseException) -> str:
    """The final line of a remote traceback: the exception and its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Opening an evaluator
# ---------------------------------------------------------------------------------------------

def check_address(address: str) -> None:
    """Refuse a malformed --ray-address, and a host:port where nothing listens, before Ray waits on it."""
    if address == AUTO:
        return
    match = re.fullmatch(r"(?P<host>[^\s:/]+):(?P<port>[0-9]{1,5})", address)
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f"--ray-address must be {AUTO} or host:port, got {address!r}")
    try:
        socket.create_connection((match["host"], int(match["port"])), timeout=5).close()
    except OSError as error:
        raise ConnectionError(f"no Ray cluster answers at {address} ({error.strerror or error}); start one "
                              "with `ray start --head` or check the address") from None


@contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Join the cluster at `address`, reuse this process's connection, or start a local Ray with
    this machine's GPUs and CPUs; disconnect (which stops a local Ray) only if this opened it."""
    if address is not None:
        check_address(address)
    if ray.is_initialized():
        yield
        return
    if address is None:
        # A local Ray starts its workers at nice 15; evaluation is this process's real work, and
        # on a shared machine a niced actor gets a small share of a core.
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, include_dashboard=False)
    except ConnectionError as error:
        raise ConnectionError(f"cannot join the Ray cluster at {address}: {error}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def open_evaluator(config: EvaluatorConfig, workers: WorkerConfig | None = None) -> Iterator[Evaluator]:
    """An Evaluator for the search: in this process (`--workers local`), or a pool of Ray actors
    on this machine or on the cluster at `--ray-address`, placed as `plan_workers` says."""
    workers = workers or WorkerConfig()
    if workers.local:
        yield ModelEvaluator(config)
        return
    model_folder(config.model)  # a bad model fails here, and a GGUF file is converted once, not per actor
    with ray_connection(workers.ray_address):
        plan = plan_workers(workers, config.device, config.threads, Cluster.current())
        logger.info("starting %s", plan.describe())
        pool = RayEvaluatorPool(start_actors(config, plan), workers.start_timeout, chunk_timeout=workers.chunk_limit)
        try:
            yield pool
        finally:
            pool.close()
