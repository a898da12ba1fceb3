"""Settings of a search: what the GA does, apart from how fitness is measured (EvaluatorConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

from chromosomes import budget
from evaluators.cli import Settings

INITS = ("random", "importance", "influence")
# Search settings added after runs were saved without them, with the value that reproduces what
# those runs did: a run saved before seam moves existed resumes with seam moves off.
ADDED_SINCE: dict[str, object] = {"seam_prob": 0.0}


def saved_search(settings: dict) -> dict:
    """A run's saved search settings, completed with the values it ran with for settings added since."""
    return {**settings, **{name: value for name, value in ADDED_SINCE.items() if name not in settings}}


@dataclass
class SearchConfig(Settings):
    """How the search runs: population, operators, budget and seed (saved in config.json)."""

    kind = "search setting"

    pop: int = field(default=16, metadata={"help": "population: the best distinct chromosomes kept from one generation to the next"})
    offspring: int = field(default=4, metadata={"help": "new chromosomes fully scored per generation"})
    gens: int = field(default=50, metadata={"help": "generations to evolve"})
    remove: int | None = field(default=None, metadata={"help": "decoder layers to remove (or give --ratio)"})
    ratio: float | None = field(default=None, metadata={"help": "fraction of decoder layers to remove (default 0.25)"})
    merge: bool = field(default=True, metadata={"help": "allow MERGE genes (else skip-only search)"})
    cx_prob: float = field(default=0.7, metadata={"help": "probability that a pair of parents is crossed"})
    mut_prob: float = field(default=0.5, metadata={"help": "probability that an offspring is mutated"})
    flip_prob: float = field(default=0.3, metadata={"help": "share of mutations that flip SKIP<->MERGE instead of moving a removed layer"})
    seam_prob: float = field(default=0.5, metadata={"help": "share of moves that never add a seam: a removed layer at the end of a run comes back and a kept layer beside a run goes (cuts in few runs repair best); the rest swap anywhere"})
    tournament: int = field(default=3, metadata={"help": "tournament size for parent selection"})
    hof: int = field(default=10, metadata={"help": "hall-of-fame size"})
    init: str = field(default="importance", metadata={"help": "initial population: importance (around the chromosome that drops the layers whose single removal hurts least: one evaluation per layer; mutation then rarely removes a layer whose single removal hurt much more); influence (around ShortGPT's lowest Block Influence layers: one dense forward); random"})
    max_evals: int = field(default=0, metadata={"help": "score at most this many chromosomes, a screening counting as its share of the scoring tokens; the generation that reaches it is cut short (0: no limit)"})
    screen_tokens: int = field(default=1024, metadata={"help": "multi-fidelity: breed --screen-factor times --offspring candidates, score them on this many tokens (whole windows, fewer than the scoring tokens) and fully score only the best --offspring (0: off)"})
    screen_factor: int = field(default=4, metadata={"help": "candidates bred per offspring when screening"})
    patience: int = field(default=10, metadata={"help": "stop after this many generations without a better best chromosome (0: never)"})
    seed: int = field(default=0, metadata={"help": "random seed: the same seed gives the same run"})

    def __post_init__(self) -> None:
        for name in ("pop", "offspring", "gens", "tournament", "hof"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.pop < 2:
            raise ValueError(f"pop must be at least 2, got {self.pop}")
        for name in ("cx_prob", "mut_prob", "flip_prob", "seam_prob"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        if self.max_evals < 0 or self.screen_tokens < 0 or self.patience < 0:
            raise ValueError("max_evals, screen_tokens and patience must not be negative")
        if self.screen_factor < 1:
            raise ValueError(f"screen_factor must be at least 1, got {self.screen_factor}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.remove is not None and self.ratio is not None:
            raise ValueError("give --remove or --ratio, not both")

    def removed(self, num_layers: int) -> int:
        """The exact number of layers every individual removes."""
        ratio = 0.25 if self.remove is None and self.ratio is None else self.ratio
        return budget(num_layers, remove=self.remove, ratio=ratio)

