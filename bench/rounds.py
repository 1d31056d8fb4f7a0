"""Interleaved rounds and what the table says about them: medians, ranges, ratios.

On a shared machine one drain says little: the load moves from one minute to the next.
So an anchor runs its two sides in alternation — crm-bridge, the yardstick, crm-bridge,
the yardstick, … — and reports each side's median with its range (min–max), and the ratio
of the medians with the range of the ratios of the pairs (round *i* of one side against
round *i* of the other, measured a few seconds apart, so under about the same load).

CPU is counted per process (``Round.cpu_s``: the consumer, the upstream, PostgreSQL) over
the drain, and shown as CPU seconds per 1,000 deliveries — which is also milliseconds of
CPU per delivery.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

CONSUMER = "consumer"
UPSTREAM = "upstream"
POSTGRES = "postgres"


@dataclass(slots=True)
class Round:
    """One drain of one side: how many deliveries, how long, and the CPU each process
    spent meanwhile (None: not measurable, e.g. a remote PostgreSQL)."""

    side: str
    deliveries: int
    seconds: float
    cpu_s: dict[str, float | None]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Deliveries per second."""
        return self.deliveries / self.seconds

    def per_1000(self, process: str) -> float | None:
        """CPU seconds of ``process`` per 1,000 deliveries (= ms per delivery)."""
        spent = self.cpu_s.get(process)
        return None if spent is None else spent / self.deliveries * 1000

    def summary(self) -> dict[str, Any]:
        """The round for results.json."""
        return {"side": self.side, "deliveries": self.deliveries,
                "seconds": round(self.seconds, 3), "rate": round(self.rate, 1),
                "cpu_s_per_1000": {k: _round(self.per_1000(k)) for k in self.cpu_s},
                **self.details}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


async def interleave(rounds: int, sides: Sequence[tuple[str, Callable[[int], Awaitable[Round]]]]
                     ) -> dict[str, list[Round]]:
    """Run ``rounds`` rounds of every side in alternation (side A, side B, side A, …);
    each side's rounds in order. ``sides`` are (name, run(round index))."""
    out: dict[str, list[Round]] = {name: [] for name, _run in sides}
    for k in range(rounds):
        for name, run in sides:
            print(f"bench:   {name} round {k + 1}/{rounds} …", file=sys.stderr, flush=True)
            got = await run(k)
            print(f"bench:   {name} round {k + 1}: {got.rate:,.0f}/s", file=sys.stderr,
                  flush=True)
            out[name].append(got)
    return out


@dataclass(frozen=True, slots=True)
class Series:
    """Several measurements of one figure: median, min, max."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median (the figure the verdict is on)."""
        return statistics.median(self.values)

    def text(self, fmt: str = ",.0f", unit: str = "") -> str:
        """``median<unit> (min–max)``; just the median when they are all one value."""
        if min(self.values) == max(self.values):
            return f"{self.median:{fmt}}{unit}"
        return (f"{self.median:{fmt}}{unit} ({min(self.values):{fmt}}–"
                f"{max(self.values):{fmt}})")


def series(values: Sequence[float | None]) -> Series | None:
    """A Series of the values, or None when any is unknown."""
    if not values or any(v is None for v in values):
        return None
    return Series(tuple(v for v in values if v is not None))


@dataclass(frozen=True, slots=True)
class Ratio:
    """A / B: the ratio of the medians, and the range of the per-pair ratios."""

    value: float
    low: float
    high: float

    def text(self) -> str:
        """``×1.11 (pairs ×0.98–1.25)``; the pair range only when there are several."""
        if self.low == self.high:
            return f"×{self.value:.2f}"
        return f"×{self.value:.2f} (pairs ×{self.low:.2f}–{self.high:.2f})"


def ratio(a: Sequence[float | None], b: Sequence[float | None]) -> Ratio | None:
    """A's median over B's, with the range of ``a[i] / b[i]``; None when unknown."""
    sa, sb = series(a), series(b)
    if sa is None or sb is None or sb.median == 0 or 0 in sb.values:
        return None
    pairs = [x / y for x, y in zip(sa.values, sb.values, strict=False)]
    return Ratio(sa.median / sb.median, min(pairs), max(pairs))


def cpu_values(rounds: Sequence[Round], process: str) -> list[float | None]:
    """CPU seconds per 1,000 deliveries of ``process`` in each round."""
    return [r.per_1000(process) for r in rounds]
