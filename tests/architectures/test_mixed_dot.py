"""Low-precision dense matmuls on CPU: bfloat16 operands, float32 accumulation (`layers.dense_dot`).

Checked against float64 numpy (forward and both gradients, for several contraction layouts), and
in the traced program: a bfloat16 `DenseGeneral` emits dots whose result type is float32 (the form
XLA:CPU runs fast) in the forward and the backward pass, while a float32 one is unchanged.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.architectures import layers

BF16 = jnp.bfloat16


def _bf16(rng, shape):
  # Values exactly representable in bfloat16, so numpy sees the very operands the dot sees.
  return np.asarray(jnp.asarray(rng.normal(size=shape), BF16).astype(jnp.float32), np.float64)


def _np_dot(x, y, dims):
  (xc, yc), _ = dims
  return np.tensordot(x, y, (list(xc), list(yc)))


@pytest.mark.parametrize(
    'x_shape,y_shape,dims',
    [
        ((3, 5, 16), (16, 7), (((2,), (0,)), ((), ()))),  # DenseGeneral's layout
        ((16, 3), (7, 16), (((0,), (1,)), ((), ()))),  # transposed operands
        ((4, 6, 5), (5, 3, 6), (((1, 2), (2, 0)), ((), ()))),  # two contracted axes, crossed
    ],
)
def test_forward_and_gradients_match_float64(x_shape, y_shape, dims):
  rng = np.random.default_rng(0)
  x, y = _bf16(rng, x_shape), _bf16(rng, y_shape)
  out_shape = _np_dot(x, y, dims).shape
  w = rng.normal(size=out_shape)  # loss = sum(w * dot(x, y))

  def loss(a, b):
    out = layers.mixed_dot_general(a, b, dims)
    assert out.dtype == BF16
    return jnp.sum(jnp.asarray(w, jnp.float32) * out.astype(jnp.float32))

  xa, ya = jnp.asarray(x, BF16), jnp.asarray(y, BF16)
  got = np.asarray(layers.mixed_dot_general(xa, ya, dims).astype(jnp.float32), np.float64)
  gx, gy = jax.grad(loss, argnums=(0, 1))(xa, ya)
  assert gx.dtype == BF16 and gy.dtype == BF16 and gx.shape == x.shape and gy.shape == y.shape

  want = _np_dot(x, y, dims)
  # d loss / dx = w . y over y's free axes, d loss / dy = x . w over x's free axes (float64).
  (xc, yc), _ = dims
  x_free = [i for i in range(x.ndim) if i not in xc]
  y_free = [i for i in range(y.ndim) if i not in yc]
  want_gx = np.zeros_like(x)
  want_gy = np.zeros_like(y)
  for idx in np.ndindex(*x.shape):
    # out[x_free..., y_free...] sums x[idx] * y[...]: gx[idx] = sum over y_free of w * y.
    ysel = [slice(None)] * y.ndim
    for i, j in zip(xc, yc):
      ysel[j] = idx[i]
    wsel = tuple(idx[i] for i in x_free) + (slice(None),) * len(y_free)
    want_gx[idx] = np.sum(w[wsel] * y[tuple(ysel)])
  for idx in np.ndindex(*y.shape):
    xsel = [slice(None)] * x.ndim
    for i, j in zip(xc, yc):
      xsel[i] = idx[j]
    wsel = (slice(None),) * len(x_free) + tuple(idx[j] for j in y_free)
    want_gy[idx] = np.sum(w[wsel] * x[tuple(xsel)])

  # bfloat16 results: 8 significant bits; accumulation in float32 keeps the error at rounding.
  scale = lambda a: np.max(np.abs(a))
  assert np.max(np.abs(got - want)) <= 2**-8 * scale(want)
  assert np.max(np.abs(np.asarray(gx, np.float64) - want_gx)) <= 2**-8 * scale(want_gx)
  assert np.max(np.abs(np.asarray(gy, np.float64) - want_gy)) <= 2**-8 * scale(want_gy)


def _dots(jaxpr):
  """(result dtype, operand dtypes) of every dot_general in a jaxpr, nested ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append(tuple(str(v.aval.dtype) for v in (*eqn.outvars, *eqn.invars)))
    for param in eqn.params.values():
      inner = getattr(param, 'jaxpr', None)
      if inner is not None and hasattr(inner, 'eqns'):
        out += _dots(inner)
      elif hasattr(param, 'eqns'):
        out += _dots(param)
  return out


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_dense_general_dots_in_the_compiled_step(dtype):
  dense = layers.DenseGeneral(features=24, kernel_axes=('embed', 'mlp'), dtype=dtype)
  x = jnp.ones((2, 5, 16), jnp.float32)
  params = dense.init(jax.random.PRNGKey(0), x)

  def loss(x):
    return jnp.sum(dense.apply(params, x).astype(jnp.float32) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(x).jaxpr
  dots = _dots(jaxpr)
  assert len(dots) >= 2, jaxpr  # the forward dot and the transposed one of the backward pass
  if dtype == 'bfloat16':
    assert all(d == ('float32', 'bfloat16', 'bfloat16') for d in dots), dots
  else:
    assert all(d == ('float32', 'float32', 'float32') for d in dots), dots


def test_float32_dense_is_unchanged():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  np.testing.assert_array_equal(
      layers.dense_dot(x, k), jax.lax.dot_general(x, k, (((1,), (0,)), ((), ())))
  )
