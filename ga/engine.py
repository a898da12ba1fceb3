"""The evolution loop: DEAP's toolbox, selection, variation, HallOfFame and Logbook, with
(mu + lambda) replacement, multi-fidelity screening, a fitness cache and an exact checkpoint
after every generation.

DEAP's `eaMuPlusLambda` has neither screening nor checkpoints, so the loop is written out here
in the shape of DEAP's checkpointing example. All randomness (DEAP's operators draw from the
global `random` module) comes from one `random.Random` whose state is checkpointed, so a
resumed run repeats exactly what an uninterrupted one would have done.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from deap import algorithms, base, tools

from chromosomes import ChromosomeRecord, Gene, LayerGene, Shape, blocks, from_string, to_string
from chromosomes.space import Guide
from chromosomes.width import Ranking, counts_left, select_global
from evaluators.fitness import Evaluator, Fitness
from ga.board import Board
from ga.checkpoint import RunError, RunFolder, restore_rng, rng_state_to_json
from ga.config import SearchConfig, saved_search
from ga.operators import gene_frequencies, mean_pairwise_hamming
from ga.problem import Problem
from ga.seeding import drop_cheapest_sublayers, drop_weights, single_skips, single_sublayer_cuts, skip_lowest
from ga.surrogate import most_promising
from gaprune.options import say


# Single-layer removals scored per call while seeding, per chromosome the evaluator scores at
# once: the bar moves, and every worker of a pool still has work in each call.
SEEDING_CHUNK = 4


class PerplexityFitness(base.Fitness):
    weights = (-1.0,)  # minimize the fitness value (perplexity, or KL from the dense model)


class Individual(list):
    """A chromosome as DEAP sees it: a list of genes carrying its fitness."""

    def __init__(self, genes=()):
        super().__init__(genes)
        self.fitness = PerplexityFitness()


@contextmanager
def drawing_from(rng: random.Random) -> Iterator[None]:
    """Let DEAP's operators (which use the global `random`) draw from the run's own generator."""
    outside = random.getstate()
    random.setstate(rng.getstate())
    try:
        yield
    finally:
        rng.setstate(random.getstate())
        random.setstate(outside)


def build_toolbox(search: SearchConfig, problem: Problem, weights: list[float] | None = None) -> base.Toolbox:
    toolbox = base.Toolbox()
    # Operators get the global `random` module as their generator: inside drawing_from it is
    # the run's generator, shared with DEAP's own operators in one reproducible stream.
    toolbox.register("individual", lambda: Individual(problem.individual(random)))
    toolbox.register("mate", problem.mate, rng=random)
    toolbox.register("mutate", problem.mutate, rng=random, flip_prob=search.flip_prob, drop_weights=weights,
                     seam_prob=search.seam_prob)
    toolbox.register("select", tools.selTournament, tournsize=search.tournament)
    return toolbox


def build_statistics() -> tools.Statistics:
    stats = tools.Statistics(key=lambda ind: ind.fitness.values[0])
    stats.register("best", np.min)
    stats.register("mean", np.mean)
    stats.register("median", np.median)
    stats.register("worst", np.max)
    return stats


@dataclass
class SearchState:
    generation: int  # generations completed; 0 means the initial population is scored
    population: list[Individual]
    hall_of_fame: tools.HallOfFame
    logbook: tools.Logbook
    rng: random.Random
    cache: dict[str, Fitness] = field(default_factory=dict)  # gene string -> fitness: never score twice
    screen_cache: dict[str, Fitness] = field(default_factory=dict)  # the same on the screening tokens
    evaluations: int = 0
    screenings: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # per generation: best, gene shares, population
    seeds: list[str] = field(default_factory=list)  # the one-shot genomes the search started from (none: random start)

    def best(self) -> tuple[list[int], Fitness]:
        genes = list(self.hall_of_fame[0])
        return genes, self.cache[to_string(genes)]

    def to_json(self) -> dict[str, Any]:
        def entry(ind: Individual) -> dict[str, Any]:
            return {"genes": list(ind), "fitness": ind.fitness.values[0]}
        return {
            "generation": self.generation,
            "population": [entry(ind) for ind in self.population],
            "hall_of_fame": [entry(ind) for ind in self.hall_of_fame],
            "logbook": list(self.logbook),
            "random_state": rng_state_to_json(self.rng.getstate()),
            "cache": {key: fitness.to_dict() for key, fitness in self.cache.items()},
            "screen_cache": {key: fitness.to_dict() for key, fitness in self.screen_cache.items()},
            "evaluations": self.evaluations,
            "screenings": self.screenings,
            "history": self.history,
            "seeds": self.seeds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], hof_size: int) -> "SearchState":
        def individual(entry: dict[str, Any]) -> Individual:
            ind = Individual(entry["genes"])
            ind.fitness.values = (entry["fitness"],)
            return ind
        hall_of_fame = tools.HallOfFame(hof_size)
        for entry in reversed(data["hall_of_fame"]):  # reversed: equal fitnesses keep their order
            hall_of_fame.insert(individual(entry))
        logbook = tools.Logbook()
        for record in data["logbook"]:
            logbook.record(**record)
        return cls(
            generation=data["generation"], population=[individual(e) for e in data["population"]],
            hall_of_fame=hall_of_fame, logbook=logbook, rng=restore_rng(data["random_state"]),
            cache={key: Fitness.from_dict(value) for key, value in data["cache"].items()},
            screen_cache={key: Fitness.from_dict(value) for key, value in data["screen_cache"].items()},
            evaluations=data["evaluations"], screenings=data["screenings"], history=data["history"],
            seeds=data.get("seeds", [data["seed"]] if data.get("seed") else []),  # one "seed" before mix existed
        )


def score(individuals: list[Individual], evaluator: Evaluator, state: SearchState,
          limit: int | None = None) -> tuple[list[Individual], int, int]:
    """Give each individual without a valid fitness its value; score every new chromosome once.

    With `limit`, at most that many new chromosomes are scored (the rest of the evaluation
    budget), and individuals left unscored are dropped, so that a search never overshoots.
    Returns (the scored individuals, new evaluations, cache hits).
    """
    invalid = [ind for ind in individuals if not ind.fitness.valid]
    keys = [to_string(ind) for ind in invalid]
    evaluations = score_chromosomes(keys, evaluator, state, limit)
    for ind, key in zip(invalid, keys):
        if key in state.cache:
            ind.fitness.values = (state.cache[key].value,)
    scored = [ind for ind in individuals if ind.fitness.valid]
    return scored, evaluations, len(invalid) - evaluations - (len(individuals) - len(scored))


def fill_cache(keys: list[str], evaluator: Evaluator, cache: dict[str, Fitness], tokens: int | None = None,
               limit: int | None = None) -> int:
    """Score the chromosomes (gene strings) not yet in `cache`, in one batch (at most `limit` of
    them); return how many were new."""
    new = list(dict.fromkeys(key for key in keys if key not in cache))[:limit]
    if new:
        for key, fitness in zip(new, evaluator.evaluate([from_string(key) for key in new], tokens=tokens)):
            cache[key] = fitness
    return len(new)


def score_chromosomes(keys: list[str], evaluator: Evaluator, state: SearchState, limit: int | None = None) -> int:
    """Score the chromosomes not yet in the fitness cache; return how many were new."""
    new = fill_cache(keys, evaluator, state.cache, limit=limit)
    state.evaluations += new
    return new


def single_skip_keys(num_layers: int) -> list[str]:
    return [to_string(genes) for genes in single_skips(num_layers)]


def one_shot_seeds(search: SearchConfig, evaluator: Evaluator, state: SearchState, problem: Problem,
                   progress: bool = False) -> list[list[LayerGene]]:
    """The genomes one-shot heuristics pick (none for a random start); what they cost in
    fitness evaluations counts against --max-evals."""
    seeds = []
    if search.init in ("width", "mix"):
        seeds.append(width_seed(evaluator, problem, state.rng))
    if search.init in ("importance", "mix"):
        skips = single_skip_keys(evaluator.num_layers)
        in_chunks(skips, lambda chunk: score_chromosomes(chunk, evaluator, state), evaluator,
                  "seeding: each layer removed alone", progress)
        seeds.append(fewest_layers(problem, [state.cache[k].value for k in skips], state.rng))
    if search.init == "influence":
        state.evaluations += 1  # one dense forward over the scoring text
        seeds.append(fewest_layers(problem, evaluator.block_influence(), state.rng))
    if search.init == "sublayers":
        seeds.append(cheapest_sublayers(search, evaluator, state, problem, progress))
    return seeds


def in_chunks(keys: list[str], score_: Callable[[list[str]], object], evaluator: Evaluator, what: str,
              progress: bool) -> None:
    """Score seeding chromosomes a few at a time, so that the bar moves."""
    from tqdm.auto import tqdm
    chunk = SEEDING_CHUNK * getattr(evaluator, "parallelism", 1)
    for start in tqdm(range(0, len(keys), chunk), desc=what, unit="chunk", disable=not progress, leave=False):
        score_(keys[start:start + chunk])


def cheapest_sublayers(search: SearchConfig, evaluator: Evaluator, state: SearchState, problem: Problem,
                       progress: bool) -> list[LayerGene]:
    """Drop the attentions and MLPs whose single removal hurts least per parameter, brought into
    the budget's window.

    Each removal alone is measured against the dense model on the screening tokens when
    screening is on: scored in full, two per layer would take most of a budget of tens of
    evaluations, and the seed only needs their order.
    """
    shape = problem.space.shape
    keys = [to_string(genes) for genes in ([Gene.KEEP] * shape.num_layers, *single_sublayer_cuts(shape))]
    if search.screen_tokens:
        def score_(chunk: list[str]) -> None:
            state.screenings += fill_cache(chunk, evaluator, state.screen_cache, search.screen_tokens)
        cache = state.screen_cache
    else:
        def score_(chunk: list[str]) -> None:
            score_chromosomes(chunk, evaluator, state)
        cache = state.cache
    in_chunks(keys, score_, evaluator, "seeding: each attention and each MLP removed alone", progress)
    dense, *singles = (cache[key].value for key in keys)
    genes = drop_cheapest_sublayers(shape, [value - dense for value in singles], problem.budget.remove)
    return problem.project(genes, state.rng)


def fewest_layers(problem: Problem, scores: list[float], rng: random.Random) -> list[LayerGene]:
    """Skip the layers of lowest score: as many as the layer budget says, or (with widths) the
    fewest that meet the parameter budget, then brought into its window."""
    if problem.layers is not None:
        return skip_lowest(scores, problem.layers)
    shape = problem.space.shape
    count = next(k for k in range(1, shape.num_layers + 1) if k * shape.whole_layer >= problem.budget.remove)
    return problem.project(skip_lowest(scores, count), rng)


def width_seed(evaluator: Evaluator, problem: Problem, rng: random.Random) -> list[LayerGene]:
    """The one-shot global width plan (the units of least importance per parameter go, wherever
    they are), rounded to the space's levels and brought into the budget's window."""
    shape = problem.space.shape
    units = evaluator.units()
    removed = select_global(units, problem.budget.remove)
    return problem.project([shape.gene(*counts) for counts in counts_left(units, removed, shape.num_layers)], rng)


def mutation_weights(state: SearchState, problem: Problem) -> list[float] | None:
    """Guide depth mutation by what each layer's single removal cost, once those are in the
    fitness cache (importance seeding puts them there); None leaves mutation uniform."""
    keys = single_skip_keys(problem.space.shape.num_layers)
    if problem.layers is None or not all(key in state.cache for key in keys):
        return None
    return drop_weights([state.cache[key].nll for key in keys], problem.layers)


def initial_candidates(toolbox: base.Toolbox, search: SearchConfig, state: SearchState,
                       seeds: list[list[LayerGene]]) -> list[Individual]:
    """Generation 0's candidates: random feasible genomes, or variants of the one-shot genomes
    (in turn) 1 to 3 mutations away; none with --gens 0, which scores the seeds alone.

    Variants of a seed are never mixed with random members: at a real budget (a quarter of the
    layers and more) a random genome is orders of magnitude worse than the seed's neighbours, so
    it would only spend evaluations.
    """
    count = candidates_per_generation(search) if search.gens else 0
    with drawing_from(state.rng):
        if not seeds:
            return [toolbox.individual() for _ in range(count)]
        variants = []
        for index in range(count):
            variant = Individual(seeds[index % len(seeds)])
            for _ in range(random.randint(1, 3)):
                toolbox.mutate(variant)
            variants.append(variant)
        return variants


def candidates_per_generation(search: SearchConfig) -> int:
    return search.offspring * (search.screen_factor if search.screen_tokens else 1)


def breed(population: list[Individual], toolbox: base.Toolbox, search: SearchConfig, state: SearchState) -> list[Individual]:
    """Candidate offspring of tournament winners, by crossover and mutation."""
    with drawing_from(state.rng):
        parents = toolbox.select(population, candidates_per_generation(search) * search.prescreen)
        return algorithms.varAnd(parents, toolbox, search.cx_prob, search.mut_prob)


def offspring_to_score(candidates: list[Individual], evaluator: Evaluator, state: SearchState, search: SearchConfig,
                       shape: Shape, screen_limit: int | None) -> list[Individual]:
    """All candidates, or when screening the --offspring best new ones on the screening tokens."""
    if not search.screen_tokens:
        return candidates
    candidates = prescreened(candidates, state, search, shape)
    return screen(candidates, search.offspring, evaluator, state, search.screen_tokens, screen_limit)


def prescreened(candidates: list[Individual], state: SearchState, search: SearchConfig, shape: Shape) -> list[Individual]:
    """With --prescreen, the new candidates (never screened nor scored) worth screening, as many
    as a generation screens, chosen by the regression on the run's screenings; else all of them."""
    if search.prescreen == 1:
        return candidates
    keys = [to_string(ind) for ind in candidates]
    fresh = list(dict.fromkeys(key for key in keys if key not in state.cache and key not in state.screen_cache))
    chosen = most_promising(fresh, state.screen_cache, shape, candidates_per_generation(search))
    return [candidates[keys.index(key)] for key in chosen]


def screen(candidates: list[Individual], keep: int, evaluator: Evaluator, state: SearchState,
           tokens: int, limit: int | None = None) -> list[Individual]:
    """Multi-fidelity: the `keep` candidates that earn a full evaluation.

    Only chromosomes never fully scored compete, ranked by their fitness on the first `tokens`
    tokens: a known one (often an unchanged copy of a parent) adds nothing to a population that
    already holds the best, and would take a place from something new. At most `limit`
    chromosomes are screened (what the evaluation budget still allows).
    """
    keys = [to_string(ind) for ind in candidates]
    fresh = list(dict.fromkeys(key for key in keys if key not in state.cache))
    state.screenings += fill_cache(fresh, evaluator, state.screen_cache, tokens, limit)
    ranked = sorted((key for key in fresh if key in state.screen_cache), key=lambda key: state.screen_cache[key].value)
    return [candidates[keys.index(key)] for key in ranked[:keep]]


def survivors(individuals: list[Individual], count: int) -> list[Individual]:
    """(mu + lambda) replacement: the best `count` distinct chromosomes among parents and offspring.

    With a budget of tens of evaluations, a generational population would throw away most of
    what it paid for; keeping the best of everything scored lets each generation spend its
    few full evaluations on the most promising variants, as EvoPress's staged selection does,
    while crossover still recombines what different members found.
    """
    distinct: dict[str, Individual] = {}
    for ind in individuals:
        distinct.setdefault(to_string(ind), ind)
    return tools.selBest(list(distinct.values()), count)


def record_generation(state: SearchState, evals: int, hits: int, stats: tools.Statistics, shape: Shape) -> dict[str, Any]:
    state.hall_of_fame.update(state.population)
    record = {"gen": state.generation, "evals": evals, "hits": hits, "total_evals": state.evaluations,
              "screenings": state.screenings,
              **{key: float(value) for key, value in stats.compile(state.population).items()},
              "diversity": mean_pairwise_hamming(state.population)}
    state.logbook.record(**record)
    state.history.append({"best": to_string(state.hall_of_fame[0]), "frequencies": gene_frequencies(state.population, shape),
                          "population": [to_string(ind) for ind in state.population]})
    return record


def best_record(state: SearchState, definition: dict[str, Any], provenance: dict[str, Any],
                ranking: Ranking | None = None) -> ChromosomeRecord:
    """best.json: the best genome, how it was measured, and (with widths) the units each of its
    layers keeps, so that the file alone rebuilds the model."""
    genes, fitness = state.best()
    measured = {"perplexity": fitness.perplexity, "nll": fitness.nll, "kl": fitness.kl, "objective": fitness.objective,
                "tokens": fitness.tokens, "seq_len": definition["seq_len"], "data": definition["data"],
                "calibration": definition.get("calibration"), "merge": definition.get("merge"),
                "repair": definition.get("repair")}
    extra = {**provenance, "generation": state.generation, "evaluations": state.evaluations}
    plan = blocks(genes)
    units = None if ranking is None or all(block.whole for block in plan) else tuple(
        ranking.kept(block.anchor, block.kv_heads, block.channels) for block in plan)
    return ChromosomeRecord(tuple(genes), definition["model"], definition["num_layers"], measured, extra, units)


def check_resumable(checkpoint: dict[str, Any], definition: dict[str, Any], search: SearchConfig,
                    problem: Problem) -> None:
    """Refuse to continue a run whose fitness meant something else, or whose search differs.
    What a width genome means (`widths`) does not matter to a search of whole layers, and runs
    saved before widths existed have no record of it."""
    saved = checkpoint["definition"]
    ignored = {"widths"} if problem.layers is not None else set()
    changed = sorted(key for key in set(saved) | set(definition) - ignored if saved.get(key) != definition.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {definition.get(key)!r}" for key in changed)
        raise RunError(f"cannot resume: the fitness is measured differently from the run's ({details})")
    if checkpoint["removed"] != problem.record():
        raise RunError(f"cannot resume: the run {Problem.words(checkpoint['removed'])}, this asks for one that "
                       f"{Problem.words(problem.record())}")
    extendable = ("gens", "max_evals", "patience")  # a run may be continued further than first planned
    before = {k: v for k, v in saved_search(checkpoint["search"]).items() if k not in extendable}
    now = {k: v for k, v in search.to_dict().items() if k not in extendable}
    if before != now:
        changed = sorted(k for k in before if before[k] != now.get(k))
        raise RunError(f"cannot resume: search settings differ from the run's ({', '.join(changed)})")


def check_screening(search: SearchConfig, definition: dict[str, Any]) -> None:
    """Screening must read whole windows, and fewer than the full fitness reads."""
    if not search.screen_tokens:
        return
    seq_len = definition["seq_len"]
    score_tokens = definition["tokens"] // (seq_len - 1) * seq_len
    if not seq_len <= search.screen_tokens < score_tokens:
        raise RunError(f"--screen-tokens {search.screen_tokens} must be at least one window ({seq_len} tokens) "
                       f"and fewer than the {score_tokens} scoring tokens; pass --screen-tokens 0 to score every "
                       "offspring in full")


def evaluations_spent(state: SearchState, search: SearchConfig, definition: dict[str, Any]) -> float:
    """Full evaluations plus screenings, each screening counted as the share of the scoring
    tokens it reads: the budget --max-evals caps, comparable with methods that never screen."""
    return state.evaluations + state.screenings * screening_share(search, definition)


def screening_share(search: SearchConfig, definition: dict[str, Any]) -> float:
    """What one screening costs, in full evaluations: the share of the scoring tokens it reads."""
    seq_len = definition["seq_len"]
    return (search.screen_tokens // seq_len) * (seq_len - 1) / definition["tokens"]


def generations_without_progress(bests: Sequence[float]) -> int:
    """Generations since the best fitness last improved, from each generation's best so far."""
    best, improved = math.inf, 0
    for generation, value in enumerate(bests):
        if value < best:
            best, improved = value, generation
    return max(0, len(bests) - 1 - improved)


def stop_reason(state: SearchState, search: SearchConfig, definition: dict[str, Any]) -> str | None:
    """Why the search stops now, in words for the user; None while it goes on."""
    if state.generation >= search.gens:
        return f"reached --gens {search.gens}" if search.gens else "scored the one-shot seed alone (--gens 0)"
    if evaluations_left(state, search, definition) == 0:
        return f"spent the evaluation budget (--max-evals {search.max_evals})"
    stalled = generations_without_progress([record["best"] for record in state.logbook])
    if search.patience and stalled >= search.patience:
        return f"no better chromosome in {stalled} generations (--patience {search.patience})"
    return None


def finished(state: SearchState, search: SearchConfig, definition: dict[str, Any]) -> bool:
    return stop_reason(state, search, definition) is not None


def evaluations_left(state: SearchState, search: SearchConfig, definition: dict[str, Any]) -> int | None:
    """Full evaluations the budget still allows (None: no budget)."""
    return _budget_left(state, search, definition, cost=1.0)


def screenings_left(state: SearchState, search: SearchConfig, definition: dict[str, Any]) -> int | None:
    """Screenings the budget still allows (None: no budget or no screening)."""
    if not search.screen_tokens:
        return None
    return _budget_left(state, search, definition, cost=screening_share(search, definition))


def _budget_left(state: SearchState, search: SearchConfig, definition: dict[str, Any], cost: float) -> int | None:
    """How many more things of this cost (in full evaluations) fit in --max-evals."""
    if not search.max_evals:
        return None
    left = search.max_evals - evaluations_spent(state, search, definition)
    return max(0, int(left / cost + 1e-9))


def evolve(evaluator: Evaluator, search: SearchConfig, folder: RunFolder,
           provenance: dict[str, Any] | None = None, progress: bool = True,
           between_generations: Callable[[], None] = lambda: None) -> SearchState:
    """Run (or continue) the search in `folder` up to `search.gens` generations, calling
    `between_generations` after each checkpoint (an interrupt that was lost is raised there)."""
    provenance = provenance or {}
    definition = evaluator.describe()
    problem = Problem.of(search, definition)
    check_screening(search, definition)
    checkpoint = folder.load_checkpoint()
    if checkpoint is not None:
        check_resumable(checkpoint, definition, search, problem)
        state = SearchState.from_json(checkpoint["state"], search.hof)
    else:
        state = SearchState(0, [], tools.HallOfFame(search.hof), tools.Logbook(), random.Random(search.seed))
    if state.population and finished(state, search, definition):
        raise RunError(f"run in {folder.path} already finished {state.generation} generations "
                       f"({state.evaluations} evaluations); pass a larger --gens or --max-evals to continue it")
    ranking = None
    if problem.budget:
        widths = definition["widths"]
        say(f"ranking every unit by {widths['ranking']} importance on {widths['ranking_tokens']:,} calibration tokens "
            "(once per run folder)", progress)
        units = evaluator.units()
        ranking = Ranking.of(units, evaluator.num_layers)
        if search.guide:
            problem = replace(problem, guide=Guide.of(units, select_global(units, problem.budget.remove)))

    def finish_generation(evals: int, hits: int, seconds: float) -> None:
        record = record_generation(state, evals, hits, stats, problem.space.shape)
        board.log_generation(record, [ind.fitness.values[0] for ind in state.population], seconds, state.history)
        folder.save_checkpoint({"definition": definition, "removed": problem.record(), "search": search.to_dict(),
                                "state": state.to_json()})
        best_record(state, definition, provenance, ranking).save(folder.best_path)
        bar.set_postfix(best=f"{record['best']:.3f}", mean=f"{record['mean']:.3f}", evals=state.evaluations)
        bar.update(1)
        between_generations()

    from tqdm.auto import tqdm
    started = time.perf_counter()
    seeds = [] if state.population else one_shot_seeds(search, evaluator, state, problem, progress)
    weights = mutation_weights(state, problem)  # after seeding: it may fill the cache
    toolbox, stats = build_toolbox(search, problem, weights), build_statistics()
    board = Board(folder.board_path, problem.space.shape, first_step=state.generation + 1 if state.population else 0,
                  objective="kl" if definition.get("fitness") == "kl" else "perplexity")
    bar = tqdm(total=search.gens + 1, initial=state.generation + 1 if state.population else 0,
               desc="generations", unit="gen", disable=not progress)
    try:
        if not state.population:
            state.seeds = [to_string(seed) for seed in seeds]
            candidates = initial_candidates(toolbox, search, state, seeds)
            offspring = [Individual(seed) for seed in seeds] + offspring_to_score(
                candidates, evaluator, state, search, problem.space.shape, screenings_left(state, search, definition))
            scored, evals, hits = score(offspring, evaluator, state, evaluations_left(state, search, definition))
            state.population = survivors(scored, search.pop)
            finish_generation(evals, hits, time.perf_counter() - started)
        while not finished(state, search, definition):
            started, generation = time.perf_counter(), state.generation + 1
            candidates = breed(state.population, toolbox, search, state)
            offspring = offspring_to_score(candidates, evaluator, state, search, problem.space.shape,
                                           screenings_left(state, search, definition))
            scored, evals, hits = score(offspring, evaluator, state, evaluations_left(state, search, definition))
            state.population, state.generation = survivors(state.population + scored, search.pop), generation
            finish_generation(evals, hits, time.perf_counter() - started)
    finally:
        bar.close()
        board.close()
    return state


__all__ = ["Individual", "SearchState", "evolve"]
