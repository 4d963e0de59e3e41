"""Balanced identity sampling, the pure part: quotas from target shares, cells from
attributes, and the filling of cells by candidates in order.

Quotas follow the largest-remainder rule (Hamilton's method): each cell first gets the
whole part of share x count, and the seats left go to the largest fractional parts (ties
to the cell listed first), so the quotas always sum to the count. With marginal targets
every axis has its own quotas and a candidate is taken when each of its values still has
room; with a joint table a candidate is taken when its cell has room. Candidates are
visited in a fixed order and never revisited, so the result depends only on that order.
job/balancing.py generates and analyses the probe images that give the attributes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.job import BALANCE_AXES, BalanceSpec
from schemas.tables import age_band_of, skin_tone_of

Cell = tuple[tuple[str, str], ...]  # ((axis, value), ...) in BALANCE_AXES order


def largest_remainder(shares: Mapping[str, float], count: int) -> dict[str, int]:
    """Integer quotas summing to `count`, proportional to `shares` (Hamilton's method)."""
    total = sum(shares.values())
    if count < 0 or total <= 0:
        raise ValueError(f"cannot share {count} seats by {dict(shares)}")
    exact = {key: count * share / total for key, share in shares.items()}
    quotas = {key: math.floor(value) for key, value in exact.items()}
    left = count - sum(quotas.values())
    order = sorted(exact, key=lambda key: -(exact[key] - quotas[key]))  # stable: listed first
    for key in order[:left]:
        quotas[key] += 1
    return quotas


def attribute_values(
    gender: str | None, age: float | None, ita: float | None, age_edges: list[float]
) -> dict[str, str | None]:
    """A face's value on every balance axis (None where it has none)."""
    return {
        "gender": gender,
        "age": age_band_of(age, age_edges),
        "skin_tone": skin_tone_of(ita),
    }


def describe(cell: Cell) -> str:
    """`gender=male,age=20-30`: how cells are named in messages and the probes manifest."""
    return ",".join(f"{axis}={value}" for axis, value in cell)


@dataclass
class CellFiller:
    """Quotas and what has been taken so far; `offer` places one candidate."""

    axes: tuple[str, ...]
    joint: bool
    quotas: dict[Cell, int]  # marginal: one-axis cells; joint: full cells
    taken: dict[Cell, int] = field(default_factory=dict)

    @classmethod
    def for_spec(cls, balance: BalanceSpec, count: int) -> CellFiller:
        axes = balance.axes()
        if balance.joint is not None:
            shares = {
                tuple((axis, getattr(cell, axis)) for axis in axes): cell.share
                for cell in balance.joint
            }
            return cls(axes, True, largest_remainder(shares, count))
        quotas: dict[Cell, int] = {}
        for axis in axes:
            targets = getattr(balance, axis)
            for value, quota in largest_remainder(targets, count).items():
                quotas[((axis, value),)] = quota
        return cls(axes, False, quotas)

    def cell_of(self, values: Mapping[str, str | None]) -> Cell | None:
        """The candidate's cell on the balanced axes; None when it lacks a value on one."""
        if any(values.get(axis) is None for axis in self.axes):
            return None
        return tuple((axis, str(values[axis])) for axis in self.axes if axis in BALANCE_AXES)

    def _parts(self, cell: Cell) -> list[Cell]:
        return [cell] if self.joint else [(pair,) for pair in cell]

    def has_room(self, cell: Cell) -> bool:
        return all(
            self.taken.get(part, 0) < self.quotas.get(part, 0) for part in self._parts(cell)
        )

    def take(self, cell: Cell) -> None:
        for part in self._parts(cell):
            self.taken[part] = self.taken.get(part, 0) + 1

    @property
    def complete(self) -> bool:
        return all(self.taken.get(cell, 0) >= quota for cell, quota in self.quotas.items())

    def unfilled(self) -> list[tuple[Cell, int, int]]:
        """(cell, taken, quota) of the cells still short, most missing first."""
        short = [
            (cell, self.taken.get(cell, 0), quota)
            for cell, quota in self.quotas.items()
            if self.taken.get(cell, 0) < quota
        ]
        return sorted(short, key=lambda item: item[1] - item[2])
