"""Benchmark-only prototype: bfloat16 matmuls that accumulate (and are emitted) in float32.

XLA's CPU backend (jax 0.10.2) runs a dot of bfloat16 operands fast (oneDNN/AMX or its own
kernels) only when the dot's result type is float32 (`preferred_element_type=jnp.float32`); a
bfloat16 x bfloat16 -> bfloat16 dot, which is what the backbone's layers emit with bfloat16
activations, is rewritten to a float32 dot with conversions around it and runs slower than float32
(see benchmarks/ANALYSIS.md). The fix belongs in `prompt_tuning/architectures/layers.py`
(`DenseGeneral`): compute with `preferred_element_type=jnp.float32` and cast the result to the
activation dtype. Dots with batch dimensions (the attention einsums) cannot take it: XLA:CPU has
no `BF16 x BF16 = F32` kernel for them and fails with UNIMPLEMENTED. This module applies that change from outside, in a
benchmark worker only (`bench_ours --dots f32acc`), so that its effect can be measured before the
layers change. Gradients use the same mixed dots: both transposed products of the backward pass
take bfloat16 operands and produce float32, cast to bfloat16.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

_LOW = (jnp.bfloat16, jnp.float16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot_general(x, y, dimension_numbers):
  """`lax.dot_general` of low-precision operands with float32 accumulation, cast back."""
  return lax.dot_general(x, y, dimension_numbers, preferred_element_type=jnp.float32).astype(
      x.dtype
  )


def _fwd(x, y, dimension_numbers):
  return mixed_dot_general(x, y, dimension_numbers), (x, y)


def _bwd(dimension_numbers, residuals, g):
  from jax._src.lax import lax as lax_internal  # pylint: disable=g-import-not-at-top

  x, y = residuals
  kw = dict(
      dimension_numbers=dimension_numbers,
      precision=None,
      preferred_element_type=jnp.float32,
      out_sharding=None,
  )
  gx = lax_internal._dot_general_transpose_lhs(g, x, y, **kw)  # pylint: disable=protected-access
  gy = lax_internal._dot_general_transpose_rhs(g, x, y, **kw)  # pylint: disable=protected-access
  return gx.astype(x.dtype), gy.astype(y.dtype)


mixed_dot_general.defvjp(_fwd, _bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """`lax.dot_general`, through `mixed_dot_general` for two low-precision operands."""
  if (
      lhs.dtype == rhs.dtype
      and lhs.dtype in _LOW
      and preferred_element_type in (None, lhs.dtype)
      and precision is None
      and not kw
      # XLA:CPU's DotThunk has no BF16 x BF16 = F32 kernel for dots with batch dimensions
      # (UNIMPLEMENTED), so the attention einsums keep bfloat16 results.
      and not any(dimension_numbers[1])
  ):
    dims = tuple(tuple(tuple(int(i) for i in axes) for axes in d) for d in dimension_numbers)
    return mixed_dot_general(lhs, rhs, dims)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kw)


class _Proxy:
  """A module stand-in that overrides some attributes and forwards the rest."""

  def __init__(self, module, **overrides):
    self._module = module
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(self._module, name)


def _einsum(subscripts, *operands, **kw):
  kw.setdefault('_dot_general', dot_general)
  return jnp.einsum(subscripts, *operands, **kw)


def install() -> None:
  """Routes the backbone's matmuls (`DenseGeneral`, attention einsums) through the mixed dots."""
  from prompt_tuning.architectures import layers  # pylint: disable=g-import-not-at-top

  layers.lax = _Proxy(lax, dot_general=dot_general)
  layers.jnp = _Proxy(jnp, einsum=_einsum)
