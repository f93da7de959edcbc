"""Learning-rate schedules against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.runtime import schedules


def _lr(fn, step):
  out = fn(step)
  assert out.dtype == jnp.float32 and out.shape == ()
  return float(out)


def test_default_t5x_schedule():
  fn = schedules.create_learning_rate_scheduler()
  # constant(0.5) * min(1, s/1000) / sqrt(max(s, 1000)), floored at 1e-8.
  assert _lr(fn, 0) == pytest.approx(1e-8)
  assert _lr(fn, 100) == pytest.approx(0.5 * 0.1 / math.sqrt(1000), rel=1e-6)
  assert _lr(fn, 1000) == pytest.approx(0.5 / math.sqrt(1000), rel=1e-6)
  assert _lr(fn, 10_000) == pytest.approx(0.5 / 100.0, rel=1e-6)


def test_prompt_tuning_constant():
  fn = schedules.create_learning_rate_scheduler(factors='constant', base_learning_rate=0.3)
  for s in [0, 1, 1_100_000, 1_150_000]:
    assert _lr(fn, s) == pytest.approx(0.3, rel=1e-7)


def test_rsqrt_decay_t5_pretraining():
  fn = schedules.create_learning_rate_scheduler(
      factors='constant * rsqrt_decay', base_learning_rate=1.0, warmup_steps=10_000
  )
  assert _lr(fn, 0) == pytest.approx(0.01, rel=1e-6)
  assert _lr(fn, 40_000) == pytest.approx(0.005, rel=1e-6)


def test_rsqrt_normalized_decay_and_decay_every():
  fn = schedules.create_learning_rate_scheduler(
      factors='constant*rsqrt_normalized_decay', base_learning_rate=2.0, warmup_steps=100
  )
  assert _lr(fn, 50) == pytest.approx(2.0, rel=1e-6)
  assert _lr(fn, 400) == pytest.approx(1.0, rel=1e-6)
  fn = schedules.create_learning_rate_scheduler(
      factors='constant * decay_every', base_learning_rate=1.0, decay_factor=0.5, steps_per_decay=10
  )
  assert [_lr(fn, s) for s in (0, 9, 10, 25, 30)] == pytest.approx([1.0, 1.0, 0.5, 0.25, 0.125])


def test_cosine_decay_cycles():
  fn = schedules.create_learning_rate_scheduler(
      factors='constant * linear_warmup * cosine_decay',
      base_learning_rate=1.0,
      warmup_steps=10,
      steps_per_cycle=100,
  )
  assert _lr(fn, 5) == pytest.approx(0.5, rel=1e-6)  # warmup, progress 0
  assert _lr(fn, 10) == pytest.approx(1.0, rel=1e-6)
  assert _lr(fn, 60) == pytest.approx(0.5, rel=1e-5)  # half a cycle
  assert _lr(fn, 85) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)), rel=1e-5)
  assert _lr(fn, 110) == pytest.approx(1.0, rel=1e-6)  # next cycle restarts


def test_linear_decay():
  # T5X: base * min(s / warmup, 1 + decay_factor * (warmup - s)).
  fn = schedules.create_learning_rate_scheduler(
      factors='linear_decay', base_learning_rate=2.0, warmup_steps=10, decay_factor=0.01
  )
  assert _lr(fn, 5) == pytest.approx(1.0, rel=1e-6)
  assert _lr(fn, 10) == pytest.approx(2.0, rel=1e-6)
  assert _lr(fn, 60) == pytest.approx(2.0 * 0.5, rel=1e-6)
  assert _lr(fn, 200) == pytest.approx(1e-8)  # negative -> min_learning_rate


def test_step_offset_and_min_learning_rate():
  fn = schedules.create_learning_rate_scheduler(
      factors='constant * linear_warmup',
      base_learning_rate=1.0,
      warmup_steps=100,
      step_offset=1000,
      min_learning_rate=1e-3,
  )
  assert _lr(fn, 500) == pytest.approx(1e-3)
  assert _lr(fn, 1000) == pytest.approx(1e-3)
  assert _lr(fn, 1050) == pytest.approx(0.5, rel=1e-6)
  assert _lr(fn, 5000) == pytest.approx(1.0, rel=1e-6)


def test_jit_and_array_steps():
  fn = schedules.create_learning_rate_scheduler()
  jitted = jax.jit(fn)
  for s in [0, 10, 1000, 2500]:
    np.testing.assert_allclose(jitted(jnp.asarray(s, jnp.int32)), fn(s), rtol=1e-6)


def test_unknown_factor_raises():
  with pytest.raises(ValueError, match='warmup_linear'):
    schedules.create_learning_rate_scheduler(factors='constant * warmup_linear')
