"""Learning-rate schedules (`t5x.utils.create_learning_rate_scheduler`)."""

from typing import Any, Callable

import jax.numpy as jnp

_KNOWN_FACTORS = (
    'constant',
    'linear_warmup',
    'linear_decay',
    'rsqrt_decay',
    'rsqrt_normalized_decay',
    'decay_every',
    'cosine_decay',
)


def create_learning_rate_scheduler(
    factors: str = 'constant * linear_warmup * rsqrt_decay',
    base_learning_rate: float = 0.5,
    warmup_steps: int = 1000,
    decay_factor: float = 0.5,
    steps_per_decay: int = 20000,
    steps_per_cycle: int = 100000,
    step_offset: int = 0,
    min_learning_rate: float = 1e-8,
) -> Callable[[Any], Any]:
  """Creates a learning-rate schedule from a product of named factors (T5X).

  With `s = max(0, step - step_offset)`, the rate is the product of:

  * `constant`: `base_learning_rate`.
  * `linear_warmup`: `min(1, s / warmup_steps)`.
  * `linear_decay`: `base_learning_rate * min(s / warmup_steps,
    1 + decay_factor * (warmup_steps - s))` (warmup then linear decay; T5X
    multiplies by the base rate inside this factor, so it is not meant to be
    combined with `constant` or `linear_warmup`).
  * `rsqrt_decay`: `1 / sqrt(max(s, warmup_steps))`.
  * `rsqrt_normalized_decay`: `sqrt(warmup_steps) / sqrt(max(s, warmup_steps))`.
  * `decay_every`: `decay_factor ** (s // steps_per_decay)`.
  * `cosine_decay`: `max(0, 0.5 * (1 + cos(pi * (p % 1))))` with
    `p = max(0, (s - warmup_steps) / steps_per_cycle)` (cyclic).

  and is finally raised to at least `min_learning_rate`.

  Args:
    factors: factor names separated by `*`.
    base_learning_rate: the `constant` factor.
    warmup_steps: warmup length.
    decay_factor: decay per `steps_per_decay` (or slope for `linear_decay`).
    steps_per_decay: period of `decay_every`.
    steps_per_cycle: cycle length of `cosine_decay`.
    step_offset: steps before this count as step 0.
    min_learning_rate: lower bound of the result.

  Returns:
    `step_fn(step) -> float32 scalar` (works on Python ints and traced arrays).

  Raises:
    ValueError: naming an unknown factor.
  """
  names = [n.strip() for n in factors.split('*')]
  for name in names:
    if name not in _KNOWN_FACTORS:
      raise ValueError(
          f'Unknown factor {name!r} in learning-rate schedule {factors!r}; '
          f'known factors: {", ".join(_KNOWN_FACTORS)}.'
      )

  def step_fn(step: Any) -> Any:
    """Step to learning rate."""
    step = jnp.maximum(0, jnp.asarray(step) - step_offset)
    ret = 1.0
    for name in names:
      if name == 'constant':
        ret *= base_learning_rate
      elif name == 'linear_warmup':
        ret *= jnp.minimum(1.0, step / warmup_steps)
      elif name == 'linear_decay':
        ret *= base_learning_rate * jnp.minimum(
            step / warmup_steps, 1.0 + decay_factor * (warmup_steps - step)
        )
      elif name == 'rsqrt_decay':
        ret /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == 'rsqrt_normalized_decay':
        ret *= jnp.sqrt(warmup_steps)
        ret /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      elif name == 'decay_every':
        ret *= decay_factor ** (step // steps_per_decay)
      elif name == 'cosine_decay':
        progress = jnp.maximum(0.0, (step - warmup_steps) / float(steps_per_cycle))
        ret *= jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
    ret = jnp.maximum(ret, min_learning_rate)
    return jnp.asarray(ret, dtype=jnp.float32)

  return step_fn
