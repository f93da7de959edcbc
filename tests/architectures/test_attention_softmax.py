"""`layers.attention_softmax` (the attention's softmax, differentiated through its output) against
a float64 numpy softmax and its Jacobian, and against `jax.nn.softmax` to second order."""

import contextlib
import io

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

from prompt_tuning.architectures import layers


def _logits(shape=(2, 3, 5, 7), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(scale=4.0, size=shape)
  x[0, 1, :, 4:] = -1e10  # masked keys, as T5's attention bias writes them
  x[1, 2, 3] += 80.0  # a row whose exponentials overflow without the max subtracted
  return x


def _numpy_softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _numpy_softmax_vjp(x, g):
  """`J^T g` with the softmax Jacobian `J = diag(y) - y y^T` of each row, built explicitly."""
  y = _numpy_softmax(x)
  rows, width = y.reshape(-1, y.shape[-1]), y.shape[-1]
  jac = np.eye(width)[None] * rows[:, :, None] - rows[:, :, None] * rows[:, None, :]
  return np.einsum('rij,ri->rj', jac, g.reshape(-1, width)).reshape(x.shape)


def _assert_close_rel(a, b, rel):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-30)
  assert np.abs(a - b).max() <= rel * scale, (np.abs(a - b).max(), scale)


def test_value_and_vjp_equal_a_float64_numpy_softmax():
  x = _logits()
  g = np.random.default_rng(1).normal(size=x.shape)
  y, vjp = jax.vjp(layers.attention_softmax, jnp.asarray(x, jnp.float32))
  (dx,) = vjp(jnp.asarray(g, jnp.float32))
  _assert_close_rel(y, _numpy_softmax(x), 1e-6)
  _assert_close_rel(dx, _numpy_softmax_vjp(x, g), 1e-5)
  assert np.all(np.asarray(y)[0, 1, :, 4:] == 0.0)  # masked keys get no weight
  assert np.all(np.isfinite(np.asarray(dx)))


def test_second_derivative_equals_jax_softmax():
  x = jnp.asarray(_logits(seed=2), jnp.float32)
  w = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)
  t = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

  def hvp(softmax):
    grad = jax.grad(lambda z: jnp.sum(w * jnp.sin(softmax(z))))
    return jax.jvp(grad, (x,), (t,))

  (g_ours, h_ours), (g_ref, h_ref) = hvp(layers.attention_softmax), hvp(jax.nn.softmax)
  _assert_close_rel(g_ours, g_ref, 1e-5)
  _assert_close_rel(h_ours, h_ref, 1e-5)


def test_the_backward_pass_keeps_only_the_softmax_output():
  """One residual, the output: what makes a T5 training step's temporaries 20% smaller."""
  x = jnp.asarray(_logits(), jnp.float32)
  w = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)

  def saved(softmax):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      ad_checkpoint.print_saved_residuals(lambda z: jnp.sum(w * softmax(z)), x)
    # `w`, closed over, is listed as a constant; the rest is what the backward keeps.
    return [l for l in out.getvalue().splitlines() if l.strip() and 'from a constant' not in l]

  ours, reference = saved(layers.attention_softmax), saved(jax.nn.softmax)
  # A linear function of the softmax needs no residual of its own: the output and nothing else.
  assert len(ours) == 1 and 'f32[2,3,5,7] output of custom_jvp_call' in ours[0], ours
  # `jax.nn.softmax` without `jax_softmax_custom_jvp` keeps the exponentials and their sums too.
  assert len(reference) > len(ours), reference
