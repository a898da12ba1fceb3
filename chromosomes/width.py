"""Width plans: which attention and MLP units each kept layer keeps, and how they are chosen.

A *unit* is the smallest piece of a layer that can go without breaking its shape: an attention
unit is one key-value head with the query heads that share it (so grouped-query attention keeps
its ratio exact), an MLP unit one intermediate channel. Selection works on a table of units,
each with an importance and a parameter cost, and knows nothing of tensors: `select_global`
removes the least important per parameter anywhere (a greedy fractional knapsack), and
`select_uniform` removes the same number of units of each kind from every layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from chromosomes.genome import Block, ChromosomeError

KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class Unit:
    layer: int  # position among the kept layers
    kind: str  # "attention" (a key-value head and its query heads) or "mlp" (a channel)
    index: int
    importance: float
    cost: int  # parameters it holds


@dataclass(frozen=True)
class LayerUnits:
    """The units one kept layer keeps: key-value head indices and MLP channel indices, ascending."""

    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return not self.kv_heads and not self.channels

    def to_dict(self) -> dict[str, list[int]]:
        return {"kv_heads": list(self.kv_heads), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, data: Any, position: int) -> "LayerUnits":
        if not isinstance(data, dict) or set(data) != {"kv_heads", "channels"}:
            raise ChromosomeError(f"units[{position}] must be an object with exactly 'kv_heads' and 'channels'")
        lists = []
        for key in ("kv_heads", "channels"):
            values = data[key]
            if (not isinstance(values, list) or any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values)
                    or values != sorted(set(values))):
                raise ChromosomeError(f"units[{position}].{key} must be ascending, distinct, non-negative integers")
            lists.append(tuple(values))
        return cls(*lists)


def check_units(units: Sequence[LayerUnits], plan: Sequence[Block]) -> None:
    """One entry per kept layer, none of them empty (an emptied layer is removed from the genes),
    and as many units as a narrowed layer's gene counts."""
    if len(units) != len(plan):
        raise ChromosomeError(f"units lists {len(units)} layers but the genes keep {len(plan)}")
    for position, (entry, block) in enumerate(zip(units, plan)):
        if entry.empty:
            raise ChromosomeError(f"units[{position}] keeps nothing: remove that layer in the genes instead")
        if block.kv_heads is not None and len(entry.kv_heads) != block.kv_heads or \
                block.channels is not None and len(entry.channels) != block.channels:
            raise ChromosomeError(f"units[{position}] keeps {len(entry.kv_heads)} key-value heads and "
                                  f"{len(entry.channels)} channels, but the gene of layer {block.anchor} says "
                                  f"{block.kv_heads} and {block.channels}")


def select_global(units: Sequence[Unit], budget: int, floors: dict[tuple[int, str], int] | None = None) -> set[Unit]:
    """The units to remove: least importance per parameter first, until `budget` parameters are gone.

    The greedy order is optimal for the fractional knapsack; with whole units it stops at the
    first unit that meets the budget, so it removes less than one unit more than asked.
    `floors` keeps at least that many units of a (layer, kind), whatever their importance. A
    layer keeps its last key-value head while it has MLP channels (a layer without attention
    breaks the KV cache's position count); once its MLP is gone, the head goes in its turn, or at
    once if its turn has passed, and the emptied layer is removed outright.
    """
    left = _counts(units)
    floors = floors or {}
    removed: set[Unit] = set()
    waiting: dict[int, Unit] = {}  # per layer, its last head, whose turn came while the MLP was still there
    total = 0

    def remove(unit: Unit) -> None:
        nonlocal total
        removed.add(unit)
        left[(unit.layer, unit.kind)] -= 1
        total += unit.cost

    for unit in sorted(units, key=lambda u: (u.importance / u.cost, u.layer, u.kind, u.index)):
        if total >= budget:
            break
        if left[(unit.layer, unit.kind)] <= floors.get((unit.layer, unit.kind), 0):
            continue
        if unit.kind == "attention" and left[(unit.layer, "attention")] == 1 and left.get((unit.layer, "mlp"), 0):
            waiting[unit.layer] = unit
            continue
        remove(unit)
        if unit.kind == "mlp" and left[(unit.layer, "mlp")] == 0 and unit.layer in waiting and total < budget:
            remove(waiting.pop(unit.layer))
    if total < budget:
        raise ChromosomeError(f"the floors leave only {total:,} removable parameters, fewer than the {budget:,} asked")
    return removed


def select_uniform(units: Sequence[Unit], budget: int) -> set[Unit]:
    """The units to remove: the same number of each kind from every layer, the least important ones.

    Of the attention counts that leave every layer at least one head, it takes the one whose
    share of attention units is nearest the share of MLP channels then needed for the budget
    (Minitron-style: both kinds shrink alike), the MLP count being the smallest that meets it.
    """
    by_layer: dict[tuple[int, str], list[Unit]] = {}
    for unit in units:
        by_layer.setdefault((unit.layer, unit.kind), []).append(unit)
    layers = sorted({unit.layer for unit in units})
    heads = _uniform_size(by_layer, layers, "attention")
    channels = _uniform_size(by_layer, layers, "mlp")
    head_cost = sum(by_layer[(layer, "attention")][0].cost for layer in layers)
    channel_cost = sum(by_layer[(layer, "mlp")][0].cost for layer in layers)
    choices = []
    for drop_heads in range(heads):
        drop_channels = max(0, math.ceil((budget - drop_heads * head_cost) / channel_cost))
        if drop_channels < channels:
            choices.append((abs(drop_heads / heads - drop_channels / channels), drop_heads, drop_channels))
    if not choices:
        raise ChromosomeError(f"a uniform cut cannot remove {budget:,} parameters and keep a head and a channel per layer")
    _, drop_heads, drop_channels = min(choices)
    removed: set[Unit] = set()
    for layer in layers:
        for kind, count in (("attention", drop_heads), ("mlp", drop_channels)):
            ranked = sorted(by_layer[(layer, kind)], key=lambda u: (u.importance, u.index))
            removed.update(ranked[:count])
    return removed


def counts_left(units: Sequence[Unit], removed: set[Unit], layers: int) -> list[tuple[int, int]]:
    """Per layer, the (key-value groups, MLP channels) left after removing `removed`."""
    left = [[0, 0] for _ in range(layers)]
    for unit in units:
        if unit not in removed:
            left[unit.layer][KINDS.index(unit.kind)] += 1
    return [(heads, channels) for heads, channels in left]


@dataclass(frozen=True)
class Ranking:
    """Per layer, its key-value groups and MLP channels from the most important down: a sub-layer
    that keeps k units keeps the first k, so every width is a prefix of one ranking.

    Ties go the way `select_global` removes them (lower importance, then lower index, first), so
    the units a global selection leaves in a layer are exactly the prefix of that size.
    """

    kv_heads: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, units: Sequence[Unit], layers: int) -> "Ranking":
        order: dict[tuple[int, str], list[Unit]] = {(layer, kind): [] for layer in range(layers) for kind in KINDS}
        for unit in units:
            order[(unit.layer, unit.kind)].append(unit)
        ranked = {key: tuple(u.index for u in sorted(group, key=lambda u: (u.importance, u.index), reverse=True))
                  for key, group in order.items()}
        return cls(tuple(ranked[(layer, "attention")] for layer in range(layers)),
                   tuple(ranked[(layer, "mlp")] for layer in range(layers)))

    def kept(self, layer: int, kv_heads: int | None, channels: int | None) -> LayerUnits:
        """The units a layer keeping these counts keeps (None: all), ascending."""
        heads = self.kv_heads[layer] if kv_heads is None else self.kv_heads[layer][:kv_heads]
        chans = self.channels[layer] if channels is None else self.channels[layer][:channels]
        return LayerUnits(tuple(sorted(heads)), tuple(sorted(chans)))


def reordered(units: Sequence[Unit], orders: dict[tuple[int, str], Sequence[int]]) -> list[Unit]:
    """The units with each (layer, kind)'s importances, largest first, handed to its units in
    `orders[(layer, kind)]` (unit indices, the one to keep longest first).

    A layer's importances stay the same set, so a global selection takes as many units from it
    as before; which ones it keeps, and so every width's prefix, now follows the order.
    """
    groups: dict[tuple[int, str], list[Unit]] = {}
    for unit in units:
        groups.setdefault((unit.layer, unit.kind), []).append(unit)
    result = []
    for key, group in groups.items():
        order = orders.get(key)
        if order is None:
            result += group
            continue
        if sorted(order) != sorted(u.index for u in group):
            raise ChromosomeError(f"the order given for layer {key[0]}'s {key[1]} units is not a permutation of them")
        by_index = {u.index: u for u in group}
        importances = sorted((u.importance for u in group), reverse=True)
        result += [Unit(key[0], key[1], index, importance, by_index[index].cost)
                   for index, importance in zip(order, importances)]
    return result


def _counts(units: Sequence[Unit]) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for unit in units:
        counts[(unit.layer, unit.kind)] = counts.get((unit.layer, unit.kind), 0) + 1
    return counts


def _uniform_size(by_layer: dict[tuple[int, str], list[Unit]], layers: list[int], kind: str) -> int:
    sizes = {len(by_layer.get((layer, kind), [])) for layer in layers}
    costs = {u.cost for layer in layers for u in by_layer.get((layer, kind), [])}
    if len(sizes) != 1 or len(costs) != 1 or 0 in sizes:
        raise ChromosomeError(f"--uniform needs layers of one width: the {kind} units differ between layers")
    return sizes.pop()
