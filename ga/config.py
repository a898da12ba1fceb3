"""Settings of a search: what the GA does, apart from how fitness is measured (EvaluatorConfig)."""
from __future__ import annotations

from dataclasses import dataclass, field

from chromosomes import SPACES, budget
from gaprune.options import Settings

INITS = ("random", "importance", "influence", "width", "mix", "sublayers")
SUBLAYER_INITS = ("width", "mix", "sublayers")  # seeds that cut sub-layers: they need a space with them
# Search settings added after runs were saved without them, with the value that reproduces what
# those runs did: a run saved before seam moves existed resumes with seam moves off, one saved
# before spaces existed searched whole layers.
# What a setting left unset becomes on each space. On the joint space a generation costs what one
# of EvoPress's does (16 candidates screened, 2 scored in full) and parents come mostly from the
# best genomes: at a budget of tens of evaluations that search reached a lower fitness than with
# the selection the other spaces keep (experiments/results/search_quality-joint).
SPACE_DEFAULTS: dict[str, dict[str, object]] = {
    "layers": {"init": "importance", "offspring": 4, "screen_factor": 4, "tournament": 3},
    "sublayers": {"init": "sublayers", "offspring": 4, "screen_factor": 4, "tournament": 3},
    "joint": {"init": "width", "offspring": 2, "screen_factor": 8, "tournament": 8},
}
ADDED_SINCE: dict[str, object] = {"seam_prob": 0.0, "space": "layers", "params": None, "mlp_levels": 8,
                                  "guide": False, "prescreen": 1}


def saved_search(settings: dict) -> dict:
    """A run's saved search settings, completed with the values it ran with for settings added since."""
    return {**settings, **{name: value for name, value in ADDED_SINCE.items() if name not in settings}}


@dataclass
class SearchConfig(Settings):
    """How the search runs: population, operators, budget and seed (saved in config.json)."""

    kind = "search setting"

    pop: int = field(default=16, metadata={"help": "population: the best distinct chromosomes kept from one generation to the next"})
    offspring: int | None = field(default=None, metadata={"help": "new chromosomes fully scored per generation (default: 2 on --space joint, else 4)"})
    gens: int = field(default=50, metadata={"help": "generations to evolve (0: score the one-shot seed alone and stop)"})
    space: str | None = field(default=None, metadata={"help": "what a gene may do: layers (skip, keep or merge a whole layer), sublayers (also drop a layer's attention or its MLP alone) or joint (also narrow them: key-value groups and MLP channels) (default: joint; layers with --remove or --ratio)"})
    params: float | None = field(default=None, metadata={"help": "decoder parameters to remove: a share below 1 (default 0.25) or a count; a genome removes at least this and less than one more level step"})
    mlp_levels: int = field(default=8, metadata={"help": "joint space: MLP widths in steps of 1/mlp_levels of the channels"})
    guide: bool = field(default=False, metadata={"help": "spaces with widths: propose level moves by how near the units they trade lie to the one-shot width plan's frontier of importance per parameter, not uniformly"})
    remove: int | None = field(default=None, metadata={"help": "layers space: decoder layers to remove (or give --ratio)"})
    ratio: float | None = field(default=None, metadata={"help": "layers space: fraction of decoder layers to remove (default 0.25)"})
    merge: bool = field(default=True, metadata={"help": "allow MERGE genes (fuse a layer into the whole layer before it)"})
    cx_prob: float = field(default=0.7, metadata={"help": "probability that a pair of parents is crossed"})
    mut_prob: float = field(default=0.5, metadata={"help": "probability that an offspring is mutated"})
    flip_prob: float = field(default=0.3, metadata={"help": "share of mutations that flip SKIP<->MERGE instead of moving a removed layer"})
    seam_prob: float = field(default=0.5, metadata={"help": "share of moves that never add a seam: a removed layer at the end of a run comes back and a kept layer beside a run goes (cuts in few runs repair best); the rest swap anywhere"})
    tournament: int | None = field(default=None, metadata={"help": "tournament size for parent selection (default: 8 on --space joint, else 3)"})
    hof: int = field(default=10, metadata={"help": "hall-of-fame size"})
    init: str | None = field(default=None, metadata={"help": "initial population (default: width for --space joint, sublayers for --space sublayers, importance for --space layers): importance (around the chromosome that drops the layers whose single removal hurts least: one evaluation per layer; mutation then rarely removes a layer whose single removal hurt much more); influence (around ShortGPT's lowest Block Influence layers: one dense forward); width (around the one-shot global width plan: the units of least importance per parameter go, wherever they are); mix (width and importance, half the candidates around each); sublayers (around the genome that drops the attentions and MLPs whose single removal hurts least per parameter: two screenings per layer, or evaluations without screening); random"})
    max_evals: int = field(default=0, metadata={"help": "score at most this many chromosomes, a screening counting as its share of the scoring tokens; the generation that reaches it is cut short (0: no limit)"})
    screen_tokens: int = field(default=1024, metadata={"help": "multi-fidelity: breed --screen-factor times --offspring candidates, score them on this many tokens (whole windows, fewer than the scoring tokens) and fully score only the best --offspring (0: off)"})
    screen_factor: int | None = field(default=None, metadata={"help": "candidates bred per offspring when screening (default: 8 on --space joint, else 4)"})
    prescreen: int = field(default=1, metadata={"help": "breed this many times the candidates to screen and screen those that a ridge regression on the run's own screenings (what each layer's attention and MLP lose) ranks best; it costs no evaluation (1: off)"})
    patience: int = field(default=8, metadata={"help": "stop after this many generations without a better best chromosome (0: never)"})
    seed: int = field(default=0, metadata={"help": "random seed: the same seed gives the same run"})

    def __post_init__(self) -> None:
        layer_budget = self.remove is not None or self.ratio is not None
        self._resolve_space(layer_budget)
        for name in ("pop", "offspring", "tournament", "hof", "mlp_levels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.gens, int) or isinstance(self.gens, bool) or self.gens < 0:
            raise ValueError(f"gens must be a non-negative integer, got {self.gens!r}")
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
        if not isinstance(self.prescreen, int) or isinstance(self.prescreen, bool) or self.prescreen < 1:
            raise ValueError(f"prescreen must be a positive integer, got {self.prescreen!r}")
        if self.prescreen > 1 and not self.screen_tokens:
            raise ValueError("--prescreen chooses which candidates to screen: it needs --screen-tokens above 0")
        if self.remove is not None and self.ratio is not None:
            raise ValueError("give --remove or --ratio, not both")
        if self.ratio is not None and not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio < 1.0):
            raise ValueError(f"ratio must lie strictly between 0 and 1, got {self.ratio!r}")
        if self.remove is not None and not (isinstance(self.remove, int) and self.remove >= 1):
            raise ValueError(f"remove must be a positive number of layers, got {self.remove!r}")
        if layer_budget and self.space != "layers":
            raise ValueError(f"--remove and --ratio count whole layers: use --params with --space {self.space}")
        if layer_budget and self.params is not None:
            raise ValueError("give --params or --remove/--ratio, not both")
        if self.params is not None and not (isinstance(self.params, (int, float)) and not isinstance(self.params, bool)
                                            and 0 < self.params and (self.params < 1 or float(self.params).is_integer())):
            raise ValueError(f"params must be a share between 0 and 1 or a whole count of parameters, got {self.params!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init in SUBLAYER_INITS and self.space == "layers":
            raise ValueError(f"--init {self.init} cuts sub-layers: it needs --space joint or sublayers")
        if self.gens == 0 and self.init == "random":
            raise ValueError("--gens 0 scores the one-shot seed alone: choose an --init other than random")

    def _resolve_space(self, layer_budget: bool) -> None:
        """The space (joint unless a layer budget is given), then its SPACE_DEFAULTS for what is unset."""
        if self.space is None:
            self.space = "layers" if layer_budget else "joint"
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        for name, value in SPACE_DEFAULTS[self.space].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def widths(self) -> bool:
        """Whether genes may narrow or drop sub-layers (a parameter budget), not only whole layers."""
        return self.space != "layers"

    def removed(self, num_layers: int, layer_parameters: int | None = None) -> int:
        """Layers space: the exact number of layers every individual removes (from --params, the
        fewest whole layers of `layer_parameters` each that remove that many parameters)."""
        if self.params is not None:
            if layer_parameters is None:
                raise ValueError("--params with --space layers needs the model's layer size")
            wanted = self.params * num_layers * layer_parameters if self.params < 1 else self.params
            return budget(num_layers, remove=min(num_layers, -int(-wanted // layer_parameters)))
        ratio = 0.25 if self.remove is None and self.ratio is None else self.ratio
        return budget(num_layers, remove=self.remove, ratio=ratio)

    @property
    def params_or_default(self) -> float:
        return 0.25 if self.params is None else self.params

