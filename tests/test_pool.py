"""The Ray evaluation pool: same numbers as in-process, whatever actor or order, through faults.

One Ray for the whole session, CPU only, with four fake GPUs (`num_gpus=4`): actors that ask for
GPUs get GPU ids and CUDA_VISIBLE_DEVICES from Ray but run on the CPU. The module's GPU pool
holds two of them, so that an actor of two GPUs can still be placed beside it.
"""
import os
import threading
import time

import pytest
import ray
import torch

from chromosomes import ChromosomeError
from evaluators.config import EvaluatorConfig
from evaluators.fitness import DeviceMemoryError, ModelEvaluator
from evaluators.pool import EvaluatorWorker, PoolError, RayEvaluatorPool, open_evaluator, start_actors
from evaluators.text import TextError
from evaluators.workers import Cluster, WorkerConfig, WorkerPlan, plan_workers

# Ten chromosomes of the 6-layer tiny model, skips and merges; FIRST sorts first by genes.
FIRST = (0, 1, 1, 1, 1, 1)
POPULATION = [(1, 0, 1, 1, 0, 1), (1, 1, 1, 1, 1, 1), (1, 2, 1, 1, 0, 1), FIRST, (1, 1, 0, 1, 1, 0),
              (1, 0, 1, 2, 1, 0), (1, 1, 2, 2, 1, 1), (0, 1, 1, 0, 1, 1), (1, 0, 1, 1, 1, 0), (1, 1, 1, 0, 0, 1)]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The one Ray of the session (start-up costs seconds): 8 logical CPUs, 4 fake GPUs."""
    os.environ["GAPRUNE_CACHE"] = str(tmp_path_factory.getbasetemp() / "gaprune-cache")  # as conftest's
    ray.init(num_cpus=8, num_gpus=4, object_store_memory=100 * 1024**2, include_dashboard=False)
    yield Cluster.current()
    ray.shutdown()


@pytest.fixture(scope="module")
def config(llama_dir, text_file) -> EvaluatorConfig:
    return EvaluatorConfig(model=str(llama_dir), data=str(text_file), seq_len=32, score_tokens=256,
                           batch_size=3, align_tokens=64, repair_tokens=256, threads=1)


@pytest.fixture(scope="module")
def reference(config):
    """Fitness computed in this process: what every pool must reproduce."""
    evaluator = ModelEvaluator(config)
    return {tokens: evaluator.evaluate(POPULATION, tokens) for tokens in (None, 64)}


@pytest.fixture(scope="module")
def gpu_pool(ray_cluster, config):
    """Two GPU actors on the fake-GPU cluster: one GPU each."""
    with open_evaluator(config, WorkerConfig(workers="2")) as pool:
        yield pool


class SlowWorker(EvaluatorWorker):
    """Pauses before each chunk (long for the chunk holding FIRST), so that chunks finish out of
    order and an actor can be killed while it holds one."""

    def evaluate(self, population, tokens=None):
        time.sleep(4.0 if FIRST in map(tuple, population) else 0.3)
        return super().evaluate(population, tokens)


@pytest.fixture(scope="module")
def slow_actors(ray_cluster, config):
    return start_actors(config, WorkerPlan(actors=2, gpus=0, threads=1), worker=SlowWorker, max_restarts=2)


@pytest.fixture(scope="module")
def slow_pool(slow_actors):
    pool = RayEvaluatorPool(slow_actors, start_timeout=180)  # model loading on a loaded 2-core machine
    yield pool
    pool.close()


def nll_and_tokens(fitnesses):
    """Everything but the wall-clock seconds, which no two runs share."""
    return [(f.perplexity, f.nll, f.tokens) for f in fitnesses]


def test_pool_scores_exactly_like_the_in_process_evaluator(gpu_pool, reference, config):
    # Exact equality: each actor runs the same code on the same weights, text and thread count.
    assert nll_and_tokens(gpu_pool.evaluate(POPULATION)) == nll_and_tokens(reference[None])
    assert nll_and_tokens(gpu_pool.evaluate(POPULATION, tokens=64)) == nll_and_tokens(reference[64])
    assert gpu_pool.last_generation.chunks == 4
    assert gpu_pool.num_layers == 6
    assert gpu_pool.describe() == ModelEvaluator(config).describe()


def test_pool_scores_width_genomes_like_the_in_process_evaluator(gpu_pool, config):
    joint = [[1, (1, 32), (2, 0), (0, 64), 1, 1], [1, 1, 1, 1, 0, 1], [1, (2, 64), 1, 1, 1, (1, 0)]]
    assert nll_and_tokens(gpu_pool.evaluate(joint)) == nll_and_tokens(ModelEvaluator(config).evaluate(joint))


def test_pool_block_influence_equals_the_in_process_one(gpu_pool, config):
    influence = gpu_pool.block_influence()
    assert influence == ModelEvaluator(config).block_influence()
    assert len(influence) == 6 and all(value > 0 for value in influence)


def test_each_actor_is_pinned_to_its_own_gpu(gpu_pool):
    placements = gpu_pool.placements
    assert len({p["gpu_ids"][0] for p in placements}) == 2 and all(len(p["gpu_ids"]) == 1 for p in placements)
    assert all(p["gpu_ids"] == [p["cuda_visible_devices"]] for p in placements)
    assert all(p["device"] == "cpu" for p in placements)  # fake GPUs: device auto stays on the CPU
    assert len({p["pid"] for p in placements}) == 2


def test_results_follow_their_individuals_when_chunks_finish_out_of_order(slow_pool, reference):
    scored = slow_pool.evaluate(POPULATION)
    report = slow_pool.last_generation
    assert report.finished[-1] == 0 and sorted(report.finished) == [0, 1, 2, 3]  # the first chunk ends last
    assert nll_and_tokens(scored) == nll_and_tokens(reference[None])


def test_killed_actor_is_restarted_and_its_chunk_resubmitted(slow_pool, slow_actors, reference):
    # At 0.5 s the first actor is inside its 4 s chunk (the one holding FIRST); Ray restarts it.
    killer = threading.Timer(0.5, lambda: ray.kill(slow_actors[0], no_restart=False))
    killer.start()
    scored = slow_pool.evaluate(POPULATION)
    killer.join()
    report = slow_pool.last_generation
    assert report.resubmitted == 1 and report.lost_actors == 0
    assert nll_and_tokens(scored) == nll_and_tokens(reference[None])
    assert nll_and_tokens(slow_pool.evaluate(POPULATION[:4])) == nll_and_tokens(reference[None][:4])


def test_actor_dead_for_good_is_dropped_and_the_others_finish(ray_cluster, config, reference):
    actors = start_actors(config, WorkerPlan(actors=2, gpus=0, threads=1), worker=SlowWorker)
    pool = RayEvaluatorPool(actors, start_timeout=180)  # model loading on a loaded 2-core machine
    killer = threading.Timer(0.5, lambda: ray.kill(actors[0], no_restart=True))
    killer.start()
    try:
        scored = pool.evaluate(POPULATION)
    finally:
        killer.join()
        pool.close()
    assert pool.last_generation.resubmitted == 1 and pool.last_generation.lost_actors == 1
    assert nll_and_tokens(scored) == nll_and_tokens(reference[None])


def hanging_worker(marker, hangs: int = 1):
    """An actor class that hangs (as on a stuck GPU) on its first `hangs` calls holding FIRST, or
    of block_influence, counted across restarts in `marker`, and then works."""
    def hang_if_due():
        calls = int(marker.read_text()) if marker.exists() else 0
        marker.write_text(str(calls + 1))
        if calls < hangs:
            time.sleep(3600)

    class HangingWorker(EvaluatorWorker):
        def evaluate(self, population, tokens=None):
            if FIRST in map(tuple, population):
                hang_if_due()
            return super().evaluate(population, tokens)

        def block_influence(self):
            hang_if_due()
            return super().block_influence()
    return HangingWorker


def test_a_chunk_past_its_timeout_has_its_actor_restarted_and_is_scored_again(ray_cluster, config, reference, tmp_path):
    actors = start_actors(config, WorkerPlan(actors=2, gpus=0, threads=1), worker=hanging_worker(tmp_path / "calls"))
    pool = RayEvaluatorPool(actors, start_timeout=300, chunk_timeout=15)
    try:
        scored = pool.evaluate(POPULATION)
    finally:
        pool.close()
    report = pool.last_generation
    assert report.timed_out == 1 and report.resubmitted == 1 and report.lost_actors == 0
    assert nll_and_tokens(scored) == nll_and_tokens(reference[None])


def test_a_chunk_that_always_hangs_fails_the_generation_with_the_reason(ray_cluster, config, tmp_path):
    actors = start_actors(config, WorkerPlan(actors=1, gpus=0, threads=1),
                          worker=hanging_worker(tmp_path / "calls", hangs=10))
    pool = RayEvaluatorPool(actors, start_timeout=300, chunk_timeout=10, max_chunk_attempts=2)
    try:
        with pytest.raises(PoolError, match="failed 2 times; the last time it took over 10 s"):
            pool.evaluate(POPULATION)
    finally:
        pool.close()
    assert (tmp_path / "calls").read_text() == "2"


def test_block_influence_asks_the_next_actor_when_one_hangs(ray_cluster, config, tmp_path):
    actors = start_actors(config, WorkerPlan(actors=2, gpus=0, threads=1), worker=hanging_worker(tmp_path / "calls"))
    pool = RayEvaluatorPool(actors, start_timeout=300, chunk_timeout=10)
    try:
        assert pool.block_influence() == ModelEvaluator(config).block_influence()
    finally:
        pool.close()


class OutOfMemoryWorker(EvaluatorWorker):
    """Its model runs out of memory on every forward, whatever the batch."""

    def __init__(self, config):
        super().__init__(config)

        def out_of_memory(_module, _args):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self._loaded().model.model.embed_tokens.register_forward_pre_hook(out_of_memory)


def test_out_of_memory_at_one_window_in_an_actor_is_raised_as_itself(ray_cluster, config):
    pool = RayEvaluatorPool(start_actors(config, WorkerPlan(actors=1, gpus=0, threads=1), worker=OutOfMemoryWorker),
                            start_timeout=300)
    try:
        with pytest.raises(DeviceMemoryError, match="out of memory on cpu scoring one window of 32 tokens"):
            pool.evaluate(POPULATION[:3])
    finally:
        pool.close()


def test_an_actor_of_several_gpus_gets_them_all_and_loads_balanced(ray_cluster, config):
    with open_evaluator(config, WorkerConfig(workers="1", gpus_per_worker=2)) as pool:
        (placement,) = pool.placements
        assert len(set(placement["gpu_ids"])) == 2
        assert sorted(placement["cuda_visible_devices"].split(",")) == sorted(placement["gpu_ids"])
        assert placement["device"] == "cpu"  # fake GPUs: balanced, like auto, stays on the CPU


def test_actor_asking_for_a_missing_gpu_fails_within_the_timeout(ray_cluster, config):
    actor = ray.remote(EvaluatorWorker).options(num_gpus=5).remote(config)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="1 of 1 evaluation actors did not start within 2 s"):
        RayEvaluatorPool([actor], start_timeout=2)
    assert time.monotonic() - started < 10


def test_text_error_inside_an_actor_is_raised_as_itself(ray_cluster, config, tmp_path):
    missing = EvaluatorConfig(**{**config.to_dict(), "data": str(tmp_path / "absent.txt"), "device": "cpu"})
    with pytest.raises(TextError, match="unknown text"):
        with open_evaluator(missing, WorkerConfig(workers="1", start_timeout=60)):
            pass


def test_bad_chromosomes_and_token_counts_are_raised_as_themselves(gpu_pool):
    with pytest.raises(ChromosomeError, match="5 genes but the model has 6"):
        gpu_pool.evaluate([POPULATION[0], (1, 1, 1, 1, 1)])
    with pytest.raises(ChromosomeError, match="cannot score on 4096 tokens"):
        gpu_pool.evaluate(POPULATION[:2], tokens=4096)


@pytest.mark.parametrize("settings, message", [
    ({"workers": "two"}, "--workers must be local, auto or a positive number"),
    ({"workers": "0"}, "--workers must be local, auto or a positive number"),
    ({"workers": "-1"}, "--workers must be local, auto or a positive number"),
    ({"gpus_per_worker": 0}, "gpus_per_worker must be a positive integer"),
    ({"chunk_timeout": -1.0}, "chunk_timeout must be a number of seconds"),
    ({"start_timeout": 0.0}, "start_timeout must be a positive number"),
])
def test_bad_worker_settings_name_the_problem(settings, message):
    with pytest.raises(ValueError, match=message):
        WorkerConfig(**settings)


@pytest.mark.parametrize("settings, message", [
    ({"workers": "5"}, "--workers 5 with --gpus-per-worker 1 asks for 5 GPUs but the Ray cluster has 4"),
    ({"gpus_per_worker": 5}, "the largest node of the Ray cluster has 4 GPUs"),
])
def test_worker_settings_the_cluster_cannot_honour_name_the_problem(ray_cluster, config, settings, message):
    with pytest.raises(ValueError, match=message):
        with open_evaluator(config, WorkerConfig(**settings)):
            pass


@pytest.mark.parametrize("address, error, message", [
    ("127.0.0.1:1", ConnectionError, "no Ray cluster answers at 127.0.0.1:1"),
    ("localhost", ValueError, "--ray-address must be auto or host:port"),
    ("host:99999", ValueError, "--ray-address must be auto or host:port"),
])
def test_bad_ray_address_names_the_problem(config, address, error, message):
    with pytest.raises(error, match=message):
        with open_evaluator(config, WorkerConfig(ray_address=address)):
            pass


CPU = Cluster(gpus=0, cpus=8, node_cpus=8, node_gpus=0)
GPU = Cluster(gpus=4, cpus=32, node_cpus=16, node_gpus=4)
TWO_NODES = Cluster(gpus=16, cpus=64, node_cpus=32, node_gpus=8)  # 2 nodes of 8 GPUs


@pytest.mark.parametrize("cluster, workers, settings, plan", [
    (CPU, {}, {}, WorkerPlan(1, 0, 8)),
    (CPU, {"workers": "2"}, {}, WorkerPlan(2, 0, 4)),
    (CPU, {"workers": "3"}, {}, WorkerPlan(3, 0, 2)),  # equal shares: the same threads give the same numbers
    (CPU, {"workers": "2"}, {"threads": 3}, WorkerPlan(2, 0, 3)),
    (Cluster(gpus=0, cpus=32, node_cpus=8, node_gpus=0), {}, {}, WorkerPlan(1, 0, 8)),  # no actor spans two nodes
    (GPU, {}, {}, WorkerPlan(4, 1, 1)),
    (GPU, {"workers": "2"}, {}, WorkerPlan(2, 1, 1)),
    (GPU, {"workers": "2"}, {"device": "cpu"}, WorkerPlan(2, 0, 16)),
    # a model larger than one GPU: actors of several GPUs of one node
    (GPU, {"gpus_per_worker": 2}, {}, WorkerPlan(2, 2, 1)),
    (GPU, {"gpus_per_worker": 3}, {}, WorkerPlan(1, 3, 1)),  # the fourth GPU stays free
    (GPU, {"gpus_per_worker": 4, "workers": "1"}, {"threads": 2}, WorkerPlan(1, 4, 2)),
    (TWO_NODES, {"gpus_per_worker": 2}, {}, WorkerPlan(8, 2, 1)),  # 8 GPUs run 4 actors of 2, on each node
    (TWO_NODES, {"gpus_per_worker": 8}, {"device": "balanced"}, WorkerPlan(2, 8, 1)),
])
def test_worker_plans(cluster, workers, settings, plan):
    assert plan_workers(WorkerConfig(**workers), EvaluatorConfig(**settings).device,
                        EvaluatorConfig(**settings).threads, cluster) == plan
    assert plan.device == ("cpu" if not plan.gpus else "auto" if plan.gpus == 1 else "balanced")


@pytest.mark.parametrize("cluster, workers, settings, message", [
    (GPU, {}, {"device": "cuda:1"}, "names one GPU"),
    (CPU, {}, {"device": "cuda"}, "--device cuda, but the Ray cluster reports no GPU"),
    (CPU, {}, {"device": "balanced"}, "--device balanced, but the Ray cluster reports no GPU"),
    (CPU, {"gpus_per_worker": 2}, {}, "--gpus-per-worker 2, but the actors run on CPUs"),
    (GPU, {"gpus_per_worker": 2}, {"device": "cpu"}, "--gpus-per-worker 2, but the actors run on CPUs"),
    (TWO_NODES, {"gpus_per_worker": 16}, {}, "largest node of the Ray cluster has 8 GPUs"),
    (GPU, {"gpus_per_worker": 2, "workers": "3"}, {}, "asks for 6 GPUs but the Ray cluster has 4"),
])
def test_device_settings_that_ray_cannot_honour_are_refused(cluster, workers, settings, message):
    with pytest.raises(ValueError, match=message):
        plan_workers(WorkerConfig(**workers), EvaluatorConfig(**settings).device, EvaluatorConfig(**settings).threads,
                     cluster)


def test_an_actor_exports_the_pick_as_the_in_process_evaluator_does(ray_cluster, config, tmp_path):
    from evaluators.export import load_pruned
    genes = POPULATION[0]
    with open_evaluator(config, WorkerConfig(workers="1")) as pool:  # its own actor: an export cuts the model
        pool.export(genes, str(tmp_path / "pool"), {"chromosome.json": "{}"})
    ModelEvaluator(config).export(genes, str(tmp_path / "local"), {"chromosome.json": "{}"})
    exported = [load_pruned(tmp_path / name).state_dict() for name in ("pool", "local")]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][key], exported[1][key]) for key in exported[0])
    assert (tmp_path / "pool" / "chromosome.json").read_text() == "{}" and (tmp_path / "pool" / "tokenizer.json").is_file()
    with pytest.raises(FileExistsError):
        ModelEvaluator(config).export(genes, str(tmp_path / "local"), {})
