"""Training and evaluation metrics that carry their own reduction (T5X's `metrics.py` idea).

A model's `loss_fn` returns `(loss, {name: Metric})`. Each metric knows how to combine with
another piece of the same quantity, so the runtime can aggregate without knowing any metric by
name:

* over the microbatches of one step and over the examples of several hosts (the jitted step sees
  the global batch): `merge`, then `finalize_step` once the step is complete;
* over evaluation batches, or the steps of a logging period: `merge` of finalized metrics;
* `compute()` gives the value.

| class | holds | merge | value |
|---|---|---|---|
| `Sum` | total | add | total (counts: `num_examples`, `num_tokens`) |
| `Average` | total, count | add both | total / count: a weighted mean or ratio (`accuracy` = correct tokens / weighted tokens), exact however the batch is split |
| `AveragePerStep` | total, steps | add both | total / steps; inside a step the microbatch totals add up and the step counts once (`loss`: the step's summed loss; over eval batches: the mean per batch) |
| `Max` | value | max | value |

Metrics are pytrees (flax struct dataclasses), so they pass through `jax.jit`, `lax.scan` and
`jax.device_get`. `float(metric)` and `np.asarray(metric)` give `compute()`. A loss term or model
may also return plain scalars: `as_metric` wraps them as `AveragePerStep`.
"""

from typing import Any, Dict, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = Any


class Metric:
  """Base of the metric types: `merge`, `finalize_step`, `compute`, `empty`."""

  def empty(self) -> 'Metric':
    """The neutral element of `merge` with this metric's shapes (zeros; `-inf` for `Max`)."""
    return jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x), jnp.float32), self)

  def merge(self, other: 'Metric') -> 'Metric':
    raise NotImplementedError

  def finalize_step(self) -> 'Metric':
    """The metric of one complete step (after merging its microbatches)."""
    return self

  def compute(self) -> Array:
    raise NotImplementedError

  def __float__(self) -> float:
    return float(np.asarray(jax.device_get(self.compute())))

  def __array__(self, dtype=None, copy=None):  # pylint: disable=redefined-builtin
    del copy
    value = np.asarray(jax.device_get(self.compute()))
    return value if dtype is None else value.astype(dtype)


def _f32(x: Array) -> Array:
  return jnp.asarray(x, jnp.float32)


@flax.struct.dataclass
class Sum(Metric):
  """A total that adds up over microbatches, hosts, batches and steps."""

  total: Array

  @classmethod
  def from_value(cls, value: Array) -> 'Sum':
    return cls(total=_f32(value))

  def merge(self, other: 'Sum') -> 'Sum':
    return type(self)(total=self.total + other.total)

  def compute(self) -> Array:
    return self.total


@flax.struct.dataclass
class Average(Metric):
  """A weighted mean `total / count` (a ratio), exact however the examples are split."""

  total: Array
  count: Array

  @classmethod
  def from_ratio(cls, numerator: Array, denominator: Array) -> 'Average':
    return cls(total=_f32(numerator), count=_f32(denominator))

  @classmethod
  def from_values(cls, values: Array, weights: Array = None) -> 'Average':
    values = _f32(values)
    weights = jnp.ones_like(values) if weights is None else _f32(weights)
    return cls(total=jnp.sum(values * weights), count=jnp.sum(weights))

  def merge(self, other: 'Average') -> 'Average':
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> Array:
    return self.total / jnp.maximum(self.count, 1e-8)


@flax.struct.dataclass
class AveragePerStep(Metric):
  """A per-step quantity: summed inside a step, averaged over steps (or evaluation batches)."""

  total: Array
  steps: Array

  @classmethod
  def from_value(cls, value: Array) -> 'AveragePerStep':
    return cls(total=_f32(value), steps=jnp.zeros((), jnp.float32))

  def merge(self, other: 'AveragePerStep') -> 'AveragePerStep':
    return type(self)(total=self.total + other.total, steps=self.steps + other.steps)

  def finalize_step(self) -> 'AveragePerStep':
    return self.replace(steps=jnp.ones((), jnp.float32))

  def compute(self) -> Array:
    return self.total / jnp.maximum(self.steps, 1.0)


@flax.struct.dataclass
class Max(Metric):
  """The largest value seen."""

  value: Array

  @classmethod
  def from_value(cls, value: Array) -> 'Max':
    return cls(value=_f32(value))

  def empty(self) -> 'Max':
    return type(self)(value=jnp.full(np.shape(self.value), -jnp.inf, jnp.float32))

  def merge(self, other: 'Max') -> 'Max':
    return type(self)(value=jnp.maximum(self.value, other.value))

  def compute(self) -> Array:
    return self.value


def empty_like(metric: Metric) -> Metric:
  """`metric.empty()` (works on shape structs from `jax.eval_shape` too)."""
  return metric.empty()


def is_metric(x: Any) -> bool:
  return isinstance(x, Metric)


def as_metric(value: Any) -> Metric:
  """A metric as is; a plain scalar as a per-step value (`AveragePerStep`)."""
  if isinstance(value, Metric):
    return value
  return AveragePerStep.from_value(value)


def as_metrics(metrics: Mapping[str, Any]) -> Dict[str, Metric]:
  return {k: as_metric(v) for k, v in metrics.items()}


def merge(a: Mapping[str, Metric], b: Mapping[str, Metric]) -> Dict[str, Metric]:
  """Merges two metric dicts name by name (names in only one of them are kept)."""
  out = dict(a)
  for k, v in b.items():
    out[k] = out[k].merge(v) if k in out else v
  return out


def finalize_step(metrics: Mapping[str, Metric]) -> Dict[str, Metric]:
  return {k: as_metric(v).finalize_step() for k, v in metrics.items()}


def compute(metrics: Mapping[str, Any]) -> Dict[str, float]:
  """`{name: float}` of (host or device) metrics; plain scalars pass through."""
  host = jax.device_get(dict(metrics))
  return {
      k: float(np.asarray(v.compute() if isinstance(v, Metric) else v)) for k, v in host.items()
  }
