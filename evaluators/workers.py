"""Where evaluation runs: how many Ray actors, what each asks of Ray, and their time limits.

Nothing here imports Ray, so that options are checked (and `--help` answers) before Ray starts.
An actor holds one GPU, or `gpus_per_worker` GPUs of one node for a model larger than one GPU
(it loads with `--device balanced`: whole decoder layers spread over its GPUs), or CPU threads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from gaprune.options import Settings

LOCAL = "local"
AUTO = "auto"


def requested_actors(workers: str) -> int | None:
    """The actor count in a --workers value: None for auto or local; ValueError for anything unusable."""
    text = str(workers).strip()
    if text in (AUTO, LOCAL):
        return None
    if re.fullmatch(r"[0-9]+", text) and int(text) > 0:
        return int(text)
    raise ValueError(f"--workers must be {LOCAL}, {AUTO} or a positive number of actors, got {workers!r}")


@dataclass
class WorkerConfig(Settings):
    """How many evaluation workers, where, and how long they may take (none of it changes a fitness)."""

    kind = "worker setting"

    workers: str = field(default=AUTO, metadata={"help": "local (in-process), auto (one Ray actor per GPU, or per "
                                                         "--gpus-per-worker GPUs; one CPU actor without GPUs), or a "
                                                         "number of actors"})
    ray_address: str | None = field(default=None, metadata={"help": "join an existing Ray cluster (auto or host:port) "
                                                                    "instead of starting one"})
    gpus_per_worker: int = field(default=1, metadata={"help": "GPUs of one node that each actor spreads its model "
                                                              "over (whole decoder layers per GPU), for a model larger "
                                                              "than one GPU: 8 H200s run 4 actors of a 70B model with 2"})
    chunk_timeout: float = field(default=3600.0, metadata={"help": "seconds an actor may spend on one chunk of "
                                                                   "chromosomes before it is killed, restarted and the "
                                                                   "chunk scored again (a hung GPU); 0: no limit"})
    start_timeout: float = field(default=300.0, metadata={"help": "seconds to wait for actors to be placed and load "
                                                                  "the model, and for a restarted one to come back"})

    def __post_init__(self) -> None:
        requested_actors(self.workers)
        if not isinstance(self.gpus_per_worker, int) or isinstance(self.gpus_per_worker, bool) or self.gpus_per_worker < 1:
            raise ValueError(f"gpus_per_worker must be a positive integer, got {self.gpus_per_worker!r}")
        if not self.chunk_timeout >= 0:
            raise ValueError(f"chunk_timeout must be a number of seconds (0: no limit), got {self.chunk_timeout!r}")
        if not self.start_timeout > 0:
            raise ValueError(f"start_timeout must be a positive number of seconds, got {self.start_timeout!r}")

    @property
    def local(self) -> bool:
        return str(self.workers).strip() == LOCAL

    @property
    def chunk_limit(self) -> float | None:
        return self.chunk_timeout or None


@dataclass(frozen=True)
class Cluster:
    """The resources a Ray cluster reports, as far as placing evaluation actors goes."""

    gpus: int
    cpus: int
    node_cpus: int  # CPUs of the largest node: one actor cannot use cores of two machines
    node_gpus: int  # GPUs of the largest node: nor GPUs of two machines

    @classmethod
    def current(cls) -> "Cluster":
        import ray

        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        return cls(gpus=int(sum(n.get("GPU", 0) for n in nodes)), cpus=int(sum(n.get("CPU", 0) for n in nodes)),
                   node_cpus=int(max((n.get("CPU", 0) for n in nodes), default=0)),
                   node_gpus=int(max((n.get("GPU", 0) for n in nodes), default=0)))


@dataclass(frozen=True)
class WorkerPlan:
    actors: int
    gpus: int  # per actor: 0 for CPU actors, 1, or more for a model spread over several GPUs
    threads: int  # torch CPU threads per actor, also the CPUs each actor asks of Ray

    @property
    def device(self) -> str:
        """The --device each actor loads its model with."""
        return "cpu" if not self.gpus else "auto" if self.gpus == 1 else "balanced"

    def describe(self) -> str:
        if self.gpus:
            device = f"{self.gpus} GPU{'s' * (self.gpus > 1)}"
        else:
            device = f"{self.threads} CPU thread{'s' * (self.threads > 1)}"
        return f"{self.actors} actor{'s' * (self.actors > 1)} of {device} each"


def plan_workers(workers: WorkerConfig, device: str, threads: int, cluster: Cluster) -> WorkerPlan:
    """One actor per GPU, or per `gpus_per_worker` GPUs (or the --workers count of such actors);
    without GPUs, CPU actors sharing the cores.

    `device` and `threads` are the evaluator's settings. Every CPU actor gets the same number of
    threads, so that no fitness depends on which actor computed it; `threads`, when set, is used
    as it is.
    """
    requested, per_actor = requested_actors(workers.workers), workers.gpus_per_worker
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} names one GPU, but Ray gives each actor its own: "
                         "use --device auto (or cuda) with Ray workers, or --workers local")
    gpus = 0 if device == "cpu" else cluster.gpus
    if device in ("cuda", "balanced") and not gpus:
        raise ValueError(f"--device {device}, but the Ray cluster reports no GPU")
    if per_actor > 1 and not gpus:
        raise ValueError(f"--gpus-per-worker {per_actor}, but the actors run on CPUs "
                         f"({'--device cpu' if device == 'cpu' else 'the Ray cluster reports no GPU'})")
    if gpus:
        if per_actor > cluster.node_gpus:
            raise ValueError(f"--gpus-per-worker {per_actor}, but the largest node of the Ray cluster has "
                             f"{cluster.node_gpus} GPUs (an actor cannot use GPUs of two machines)")
        actors = requested or max(1, gpus // per_actor)
        if actors * per_actor > gpus:
            raise ValueError(f"--workers {actors} with --gpus-per-worker {per_actor} asks for {actors * per_actor} "
                             f"GPUs but the Ray cluster has {gpus}")
        return WorkerPlan(actors, per_actor, threads or 1)
    actors = requested or 1
    if actors > max(cluster.cpus, 1):
        raise ValueError(f"--workers {actors} asks for {actors} CPU actors but the Ray cluster has {cluster.cpus} CPUs")
    return WorkerPlan(actors, 0, threads or max(1, min(cluster.cpus // actors, cluster.node_cpus)))
