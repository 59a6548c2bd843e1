"""The service-level agreement the scheduler works to: hard limits and a ranking.

DESIGN.md part 5: the user gives hard limits, which drop infeasible decisions, and a
ranking of the five metrics, which the scheduler optimises lexicographically.  An SLA
comes from command-line flags or from a TOML or JSON file (docs/SCHEDULER.md, "SLA"):

.. code-block:: toml

    # latency ≤ 80 ms; then maximise accuracy; then minimise server cost
    max_latency_ms = 80
    rank = ["accuracy", "server_cost"]

Metrics not named in ``rank`` follow it in the default order, so every decision is
fully determined. The command-line flags of an SLA are in ``spinn.runtime.flags``.
"""

from __future__ import annotations

import enum
import json
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_RANK",
    "SLA",
    "Metric",
    "SLAError",
]


class SLAError(ValueError):
    """An SLA flag or file is malformed; the message names the bad key."""


class Metric(enum.StrEnum):
    """The five metrics of DESIGN.md part 5, with their natural direction."""

    LATENCY = "latency"
    """Expected end-to-end latency per input, ms (minimised)."""
    THROUGHPUT = "throughput"
    """Sustained inferences per second of the device–network–server pipeline (maximised)."""
    SERVER_COST = "server_cost"
    """Expected server compute per input, ms (minimised)."""
    DEVICE_COST = "device_cost"
    """Expected device compute per input, ms (minimised)."""
    ACCURACY = "accuracy"
    """Top-1 accuracy on the calibration set (maximised)."""


DEFAULT_RANK: tuple[Metric, ...] = (
    Metric.ACCURACY,
    Metric.LATENCY,
    Metric.THROUGHPUT,
    Metric.SERVER_COST,
    Metric.DEVICE_COST,
)
"""Without a ranking: the most accurate decision, near-ties broken by latency, and so on."""

_LIMIT_KEYS = (
    "max_latency_ms",
    "min_throughput",
    "max_server_cost_ms",
    "max_device_cost_ms",
    "min_accuracy",
)


def _limit(name: str, value: Any, hi: float = math.inf) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SLAError(f"SLA {name}: expected a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0 or out > hi:
        raise SLAError(f"SLA {name}: must be a finite number in [0, {hi}], got {value!r}")
    return out


def _parse_rank(value: Any) -> tuple[Metric, ...]:
    if isinstance(value, str):
        items: Sequence[Any] = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, Sequence):
        items = value
    else:
        raise SLAError(f"SLA rank: expected a list of metric names, got {value!r}")
    out: list[Metric] = []
    for item in items:
        try:
            metric = Metric(item)
        except ValueError:
            names = ", ".join(m.value for m in Metric)
            raise SLAError(f"SLA rank: unknown metric {item!r} (known: {names})") from None
        if metric in out:
            raise SLAError(f"SLA rank: metric {item!r} listed twice")
        out.append(metric)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SLA:
    """Hard limits (``None``: no limit) and the ranking of the metrics."""

    max_latency_ms: float | None = None
    """Expected latency per input must not exceed this (ms)."""
    min_throughput: float | None = None
    """Sustained throughput must reach this (inferences/s)."""
    max_server_cost_ms: float | None = None
    """Expected server compute per input must not exceed this (ms)."""
    max_device_cost_ms: float | None = None
    """Expected device compute per input must not exceed this (ms)."""
    min_accuracy: float | None = None
    """Calibration accuracy must reach this (0..1)."""
    rank: tuple[Metric, ...] = DEFAULT_RANK
    """Metrics in order of importance; missing ones follow in ``DEFAULT_RANK`` order."""

    def __post_init__(self) -> None:
        for key in _LIMIT_KEYS:
            hi = 1.0 if key == "min_accuracy" else math.inf
            object.__setattr__(self, key, _limit(key, getattr(self, key), hi))
        object.__setattr__(self, "rank", _parse_rank(self.rank))

    @property
    def order(self) -> tuple[Metric, ...]:
        """The full lexicographic order: ``rank`` then the rest in default order."""
        return self.rank + tuple(m for m in DEFAULT_RANK if m not in self.rank)

    def describe(self) -> str:
        """Human summary, e.g. 'latency ≤ 80 ms; then maximise accuracy; then ...'."""
        parts = []
        if self.max_latency_ms is not None:
            parts.append(f"latency ≤ {self.max_latency_ms:g} ms")
        if self.min_throughput is not None:
            parts.append(f"throughput ≥ {self.min_throughput:g}/s")
        if self.max_server_cost_ms is not None:
            parts.append(f"server cost ≤ {self.max_server_cost_ms:g} ms")
        if self.max_device_cost_ms is not None:
            parts.append(f"device cost ≤ {self.max_device_cost_ms:g} ms")
        if self.min_accuracy is not None:
            parts.append(f"accuracy ≥ {100 * self.min_accuracy:g}%")
        verbs = {
            Metric.LATENCY: "minimise latency",
            Metric.THROUGHPUT: "maximise throughput",
            Metric.SERVER_COST: "minimise server cost",
            Metric.DEVICE_COST: "minimise device cost",
            Metric.ACCURACY: "maximise accuracy",
        }
        ranked = [verbs[m] for m in self.rank]
        if parts:
            ranked = ["then " + r for r in ranked]
        return "; ".join(parts + ranked) or "no limits"

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], source: str = "SLA") -> SLA:
        """Build from a parsed file: the limit keys and ``rank``; anything else is an error."""
        if not isinstance(doc, Mapping):
            raise SLAError(f"{source}: expected a table/object, got {type(doc).__name__}")
        unknown = set(doc) - set(_LIMIT_KEYS) - {"rank"}
        if unknown:
            raise SLAError(
                f"{source}: unknown keys {sorted(unknown)} (known: {[*_LIMIT_KEYS, 'rank']})"
            )
        kwargs: dict[str, Any] = {k: doc[k] for k in _LIMIT_KEYS if k in doc}
        if "rank" in doc:
            kwargs["rank"] = _parse_rank(doc["rank"])
        try:
            return cls(**kwargs)
        except SLAError as exc:
            raise SLAError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SLA:
        """Read a ``.toml`` or ``.json`` SLA file (by extension)."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise SLAError(f"SLA file {name!r}: {exc.strerror}") from exc
        try:
            if name.endswith(".toml"):
                doc: Any = tomllib.loads(data.decode("utf-8"))
            elif name.endswith(".json"):
                doc = json.loads(data)
            else:
                raise SLAError(f"SLA file {name!r}: use a .toml or .json extension")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SLAError(f"SLA file {name!r} does not parse: {exc}") from exc
        return cls.from_mapping(doc, source=f"SLA file {name!r}")

    def replace(self, **changes: Any) -> SLA:
        """A copy with some fields changed (flags override a file)."""
        fields: dict[str, Any] = {k: getattr(self, k) for k in (*_LIMIT_KEYS, "rank")}
        fields.update(changes)
        return SLA(**fields)
