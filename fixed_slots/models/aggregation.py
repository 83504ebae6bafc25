"""How a model's numbers are summed over steps and images: `clu.metrics` collections.

Each model declares two collections (as SAVi's `lib/metrics.py` does): `train_metrics`, over the
scalars of its training forward pass (`ModelOutput.metrics`), and `eval_metrics`, over the
per-image values of `evaluate_batch` (`EvalBatch.per_example`). A per-image score such as FG-ARI
is averaged over images, each image counting once whatever batch it came in, with its spread
over images (`Std`) so that an evaluation's own noise (std / sqrt(images)) is known.

The collections are built and merged inside jitted functions (`single_from_model_output`,
`merge`) and read on the host (`compute`). `Std` is ours: clu's calls `jnp.clip(a_min=...)`,
which jax >= 0.10 removed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import flax
import jax.numpy as jnp
from clu import metrics

Collection = metrics.Collection


@flax.struct.dataclass
class Std(metrics.Metric):
    """Sample standard deviation (n - 1) of every value seen, merged exactly across batches
    (Chan et al.'s pairwise update of count, mean and squared deviations: no E[x^2] - E[x]^2
    cancellation). NaN below two values."""

    count: jnp.ndarray
    mean: jnp.ndarray
    m2: jnp.ndarray

    @classmethod
    def from_model_output(cls, values: jnp.ndarray, **_: Any) -> "Std":
        values = jnp.asarray(values, jnp.float32).reshape(-1)
        count = jnp.asarray(values.size, jnp.float32)
        mean = jnp.mean(values) if values.size else jnp.zeros((), jnp.float32)
        m2 = jnp.sum(jnp.square(values - mean))
        return cls(count=count, mean=mean, m2=m2)

    def merge(self, other: "Std") -> "Std":
        count = self.count + other.count
        delta = other.mean - self.mean
        share = jnp.where(count > 0, other.count / jnp.maximum(count, 1.0), 0.0)
        mean = self.mean + delta * share
        m2 = self.m2 + other.m2 + jnp.square(delta) * self.count * share
        return type(self)(count=count, mean=mean, m2=m2)

    def compute(self) -> jnp.ndarray:
        return jnp.where(self.count > 1, jnp.sqrt(self.m2 / jnp.maximum(self.count - 1, 1.0)),
                         jnp.nan)


def average(name: str) -> type[metrics.Metric]:
    """The mean of output `name` over everything seen (steps, or images)."""
    return metrics.Average.from_output(name)


def last(name: str) -> type[metrics.Metric]:
    """The latest value of output `name` (a schedule's value, e.g. the Gumbel temperature)."""
    return metrics.LastValue.from_output(name)


def std(name: str) -> type[metrics.Metric]:
    """The sample standard deviation of output `name` over everything seen."""
    return Std.from_output(name)


def per_image(*names: str) -> dict[str, type[metrics.Metric]]:
    """For per-image scores: `name` (the mean over images) and `name_std` (their spread)."""
    out: dict[str, type[metrics.Metric]] = {}
    for name in names:
        out[name] = average(name)
        out[f"{name}_std"] = std(name)
    return out


def collection(**fields: type[metrics.Metric]) -> type[Collection]:
    """A clu Collection class with these fields (name -> metric class)."""
    return metrics.Collection.create(**fields)


def fields(collection_cls: type[Collection]) -> dict[str, type[metrics.Metric]]:
    """name -> metric class of a collection class."""
    return {f.name: f.type for f in dataclasses.fields(collection_cls)
            if not f.name.startswith("_")}  # clu's own bookkeeping field


def extend(collection_cls: type[Collection], **more: type[metrics.Metric]) -> type[Collection]:
    """The collection with more fields (the train step adds the gradient norm, ...)."""
    return collection(**fields(collection_cls), **more)


def restrict(collection_cls: type[Collection], outputs: Iterable[str]) -> type[Collection]:
    """The collection without the fields whose output is not among `outputs` (e.g. ARI on
    data without masks). A field reads the output named after it, or after its `_std` stem."""
    present = set(outputs)
    keep = {name: metric for name, metric in fields(collection_cls).items()
            if name in present or (name.endswith("_std") and name[:-len("_std")] in present)}
    return collection(**keep)


def to_host(computed: dict[str, Any]) -> dict[str, float]:
    """`Collection.compute()`'s arrays as Python floats."""
    return {name: float(value) for name, value in computed.items()}
