"""Flax building blocks of the T5 family, numerically and nominally as flaxformer.

Every parameter is created with `flax.linen.partitioning.param_with_axes`, so `init` returns a
`params_axes` collection next to `params` (T5X's `get_initial_variables` contract). Parameters are
stored float32; activations use the module's `dtype`; layer-norm statistics and output logits are
float32.

Parameter names and shapes equal flaxformer's: attention projections are single 2-D kernels
(`[d_model, heads * head_dim]` for query/key/value with axes `('embed', 'joined_kv')`, and
`[heads * head_dim, d_model]` for `out` with axes `('joined_kv', 'embed')`), MLP kernels `wi`
(one activation) or `wi_0`, `wi_1`, ... and `wo`, RMSNorm `scale`, embedding `embedding`, and the
relative position bias `rel_embedding` `[heads, buckets]`.

Activations carry logical sharding constraints (`('batch', 'length', 'embed')`,
`('batch', 'length', 'heads', 'kv')`, `('batch', 'length', 'mlp')`); they are no-ops unless a mesh
and logical axis rules are active.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning

from prompt_tuning import masks as masks_lib
from prompt_tuning.architectures import hooks as hooks_lib

Array = Any
DType = Any
Initializer = Callable[..., Array]

param_with_axes = nn_partitioning.param_with_axes


default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')
attention_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')
relpos_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
embedding_init = nn.initializers.normal(stddev=1.0)


def with_sharding_constraint(x: Array, logical_axes: Tuple[Optional[str], ...]) -> Array:
  """Applies a logical-axis sharding constraint; a no-op without an active mesh and rules."""
  return nn_partitioning.with_sharding_constraint(x, logical_axes)


def to_dtype(dtype: DType) -> jnp.dtype:
  """Normalizes a dtype given as a string (`'bfloat16'`), a numpy/jax type or a dtype."""
  return jnp.dtype(dtype)


# ----------------------------------------------------------------------------------------------
# Dense matmuls
# ----------------------------------------------------------------------------------------------

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_dot_general(x: Array, y: Array, dimension_numbers) -> Array:
  """`lax.dot_general` of two low-precision operands, accumulated in float32, cast back.

  Its gradient computes both transposed products the same way (low-precision operands, float32
  results). XLA's CPU backend runs a bfloat16 dot fast (oneDNN / AMX, its own kernels) only when
  the dot's result type is float32; a bfloat16 x bfloat16 -> bfloat16 dot is rewritten to a float32
  dot with conversions around it and runs below float32 speed (benchmarks/ANALYSIS.md). Asking for
  a float32 result alone is not enough for training: JAX's transpose of such a dot multiplies the
  float32 cotangent by the bfloat16 kernel, which is again a float32 dot; hence the custom VJP.
  """
  return lax.dot_general(x, y, dimension_numbers, preferred_element_type=jnp.float32).astype(
      x.dtype
  )


def _mixed_dot_general_fwd(x, y, dimension_numbers):
  return mixed_dot_general(x, y, dimension_numbers), (x, y)


def _mixed_dot_general_bwd(dimension_numbers, residuals, g):
  (x_contract, y_contract), (x_batch, y_batch) = dimension_numbers
  if x_batch or y_batch:
    raise NotImplementedError('mixed_dot_general: dots with batch dimensions')
  x, y = residuals
  x_free = [i for i in range(x.ndim) if i not in x_contract]
  y_free = [i for i in range(y.ndim) if i not in y_contract]
  # g has axes x_free + y_free. dx = g . y over y_free; dy = x . g over x_free.
  g_x_free = tuple(range(len(x_free)))
  g_y_free = tuple(range(len(x_free), g.ndim))
  gx = lax.dot_general(
      g, y, ((g_y_free, tuple(y_free)), ((), ())), preferred_element_type=jnp.float32
  )
  # gx has axes x_free + y_contract (in y_contract's order); put them where x has them.
  gx_axes = x_free + [x_contract[list(y_contract).index(j)] for j in sorted(y_contract)]
  gx = jnp.transpose(gx, np.argsort(gx_axes))
  gy = lax.dot_general(
      x, g, ((tuple(x_free), g_x_free), ((), ())), preferred_element_type=jnp.float32
  )
  # gy has axes x_contract (in x's order) + y_free.
  gy_axes = [y_contract[list(x_contract).index(i)] for i in sorted(x_contract)] + y_free
  gy = jnp.transpose(gy, np.argsort(gy_axes))
  return gx.astype(x.dtype), gy.astype(y.dtype)


mixed_dot_general.defvjp(_mixed_dot_general_fwd, _mixed_dot_general_bwd)


def dense_dot(x: Array, kernel: Array) -> Array:
  """`x @ kernel` over x's last axis: through `mixed_dot_general` for low-precision operands on
  the CPU backend (where it is several times faster), `lax.dot_general` otherwise (float32, and
  TPU/GPU, whose low-precision dots accumulate in float32 already)."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  if x.dtype == kernel.dtype and x.dtype in _LOW_PRECISION and jax.default_backend() == 'cpu':
    return mixed_dot_general(x, kernel, dims)
  return lax.dot_general(x, kernel, dims)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class DenseGeneral(nn.Module):
  """Bias-free linear map on the last axis, with a 2-D kernel `[in, features]`.

  Attributes:
    features: number of output features.
    kernel_axes: logical axis names of the kernel.
    dtype: computation dtype (the kernel is stored float32 and cast).
    kernel_init: kernel initializer `(rng, shape, dtype)`.
    hooks: the methods' hooks (`hooks.Hooks`); `hooks.dense(site)` modules get `(x, y, ctx)` and
      return the new output (e.g. LoRA's low-rank update).
    site: this kernel's site (`hooks.Site` with `kernel` set); needed with `hooks`.
  """

  features: int
  kernel_axes: Tuple[str, str]
  dtype: DType = jnp.float32
  kernel_init: Initializer = default_kernel_init
  hooks: Optional[hooks_lib.Hooks] = None
  site: Optional[hooks_lib.Site] = None

  @nn.compact
  def __call__(
      self,
      inputs: Array,
      ctx: Optional[hooks_lib.Context] = None,
      *,
      product: Optional[Array] = None,
      kernel_only: bool = False,
  ) -> Any:
    """`inputs @ kernel`, then the dense hooks.

    Args:
      inputs: `[..., in_features]`.
      ctx: what the hooks may read.
      product: `inputs @ kernel` computed already (by one matmul over several kernels, see
        `fused_dense`); only the hooks run on it.
      kernel_only: return `(kernel, has_hooks)` instead: the kernel cast to `dtype`, and whether
        dense hooks sit on it.

    Returns:
      `[..., features]`, or `(kernel, has_hooks)` with `kernel_only`.
    """
    dtype = to_dtype(self.dtype)
    kernel = param_with_axes(
        'kernel',
        self.kernel_init,
        (inputs.shape[-1], self.features),
        jnp.float32,
        axes=self.kernel_axes,
    )
    kernel = jnp.asarray(kernel, dtype)
    hook_modules = hooks_lib.build(self.hooks, 'dense', self.site)
    if kernel_only:
      return kernel, bool(hook_modules)
    inputs = jnp.asarray(inputs, dtype)
    if product is None:
      y = dense_dot(inputs, kernel)
    else:
      y = product
    if hook_modules:
      ctx = hooks_lib.Context() if ctx is None else ctx
      for hook in hook_modules:
        y = hook(inputs, y, ctx)
    return y


def fused_dense(
    denses: Sequence[DenseGeneral],
    inputs: Array,
    ctx: Optional[hooks_lib.Context] = None,
    fuse: bool = True,
) -> List[Array]:
  """Applies several `DenseGeneral`s to the same input, with one matmul when `fuse`.

  The kernels stay separate parameters (flaxformer's names: `query/kernel`, `key/kernel`, ...);
  they are concatenated along their output axis inside the computation, multiplied once, and the
  product is split again. Each dense's hooks then run on its own slice, so a hook sees exactly the
  `(x, x @ kernel)` it would see unfused. One wide matmul reads the input once and keeps the
  matrix unit busier than several narrow ones.

  Args:
    denses: the dense layers (same input width, same dtype).
    inputs: `[..., in_features]`.
    ctx: what the hooks may read.
    fuse: with False, each dense runs on its own (the reference the fused path is tested against).

  Returns:
    The outputs, one per dense, in order.
  """
  if not fuse or len(denses) < 2:
    return [d(inputs, ctx) for d in denses]
  kernels = [d(inputs, kernel_only=True)[0] for d in denses]
  x = jnp.asarray(inputs, kernels[0].dtype)
  # Named after the kernels (`query+key+value`), so profiles and HLO dumps say what it is.
  with jax.named_scope('+'.join(str(d.name) for d in denses)):
    joined = jnp.concatenate(kernels, axis=1)
    y = dense_dot(x, joined)
  outs, start = [], 0
  for d, kernel in zip(denses, kernels):
    width = kernel.shape[1]
    outs.append(d(inputs, ctx, product=y[..., start : start + width]))
    start += width
  return outs


class LayerNorm(nn.Module):
  """T5 RMSNorm: `x * rsqrt(mean(x**2) + eps) * scale`, statistics in float32, no bias."""

  epsilon: float = 1e-6
  dtype: DType = jnp.float32
  scale_init: Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    features = x.shape[-1]
    var = jnp.mean(lax.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * lax.rsqrt(var + self.epsilon), to_dtype(self.dtype))
    scale = param_with_axes('scale', self.scale_init, (features,), jnp.float32, axes=('embed',))
    return y * jnp.asarray(scale, to_dtype(self.dtype))


class Embed(nn.Module):
  """Token embedding `[vocab, d_model]` (axes `('vocab', 'embed')`) with a float32 `attend`."""

  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  attend_dtype: DType = jnp.float32
  embedding_init: Initializer = embedding_init

  def setup(self):
    self.embedding = param_with_axes(
        'embedding',
        self.embedding_init,
        (self.num_embeddings, self.features),
        jnp.float32,
        axes=('vocab', 'embed'),
    )

  def __call__(self, inputs: Array) -> Array:
    """Embeds integer ids `[...]` -> `[..., features]` in `dtype`."""
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError('Input type must be an integer or unsigned integer.')
    inputs = inputs.astype(jnp.int32)
    # Plain gather (numerically identical to flaxformer's one-hot matmul); out-of-range ids clamp.
    output = jnp.asarray(self.embedding, to_dtype(self.dtype))[inputs]
    return with_sharding_constraint(output, ('batch', 'length', 'embed'))

  def attend(self, query: Array) -> Array:
    """Dot product of `query [..., features]` with every embedding -> `[..., vocab]`."""
    dtype = to_dtype(self.attend_dtype)
    return jnp.dot(jnp.asarray(query, dtype), jnp.asarray(self.embedding, dtype).T)


def relative_position_bucket(
    relative_position: np.ndarray,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
  """T5 bucketing of `relative_position = memory_position - query_position` (numpy, static).

  Exact transcription of flaxformer/T5X `_relative_position_bucket`: half of the buckets (or all,
  when causal) are exact offsets `0 .. max_exact-1`; the rest grow logarithmically up to
  `max_distance`; bidirectional buckets put positive offsets (keys after the query) in the upper
  half.
  """
  relative_position = np.asarray(relative_position)
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact)
      * (num_buckets - max_exact)
  ).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  ret += np.where(is_small, n, val_if_large)
  return np.asarray(ret, dtype=np.int32)


class RelativePositionBiases(nn.Module):
  """T5 relative position bias `[1, heads, q_len, k_len]`, one per stack, shared by its layers.

  In decode mode the bias for `max_decode_length x max_decode_length` is computed once and kept
  in the `cache` collection as `cached_bias`; attention layers slice the rows they need.
  """

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: DType = jnp.float32
  embedding_init: Initializer = relpos_init

  @nn.compact
  def __call__(
      self, qlen: int, klen: int, bidirectional: bool = True, decode: bool = False
  ) -> Array:
    if decode and self.has_variable('cache', 'cached_bias'):
      return self.get_variable('cache', 'cached_bias')
    context_position = np.arange(qlen, dtype=np.int32)[:, None]
    memory_position = np.arange(klen, dtype=np.int32)[None, :]
    buckets = relative_position_bucket(
        memory_position - context_position,
        bidirectional=bidirectional,
        num_buckets=self.num_buckets,
        max_distance=self.max_distance,
    )
    rel_embedding = param_with_axes(
        'rel_embedding',
        self.embedding_init,
        (self.num_heads, self.num_buckets),
        jnp.float32,
        axes=('heads', 'relpos_buckets'),
    )
    values = jnp.take(
        jnp.asarray(rel_embedding, to_dtype(self.dtype)), jnp.asarray(buckets), axis=1
    )  # [heads, q, k]
    values = values[None]
    if decode:
      self.variable('cache', 'cached_bias', lambda: values)
    return values


def _attention_dropout(
    attn_weights: Array, dropout_rng: Optional[Array], dropout_rate: float, dtype: DType
) -> Array:
  """Dropout on attention weights `[b, h, q, k]`, one mask broadcast over the queries."""
  keep_prob = 1.0 - dropout_rate
  dropout_shape = list(attn_weights.shape)
  dropout_shape[-2] = 1
  keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
  keep = jnp.broadcast_to(keep, attn_weights.shape)
  multiplier = keep.astype(attn_weights.dtype) / jnp.asarray(keep_prob, dtype=dtype)
  return attn_weights * multiplier


@jax.custom_jvp
def attention_softmax(logits: Array) -> Array:
  """Softmax over the last axis whose derivative keeps only its output.

  Equal to `jax.nn.softmax` in value. Its derivative is written in terms of the output `y`, as
  PyTorch's softmax backward: `dx = y * (dy - sum(y * dy))`. `jax.nn.softmax` differentiates
  `exp(x - max) / sum` step by step unless `jax_softmax_custom_jvp` is set (off in this JAX), so a
  training step would keep the exponentials, their sums and a broadcast of the reciprocal (three
  `[batch, heads, q, k]` arrays per layer) for the backward pass instead of one, and run the
  backward's longer element-wise chain: the T5 1.1 small training step's temporaries were 750 MiB
  at P=100 against 597 MiB now (`benchmarks/ANALYSIS.md`).
  """
  unnormalized = jnp.exp(logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  return unnormalized / jnp.sum(unnormalized, axis=-1, keepdims=True)


@attention_softmax.defjvp
def _attention_softmax_jvp(primals, tangents):
  (logits,), (logits_dot,) = primals, tangents
  y = attention_softmax(logits)
  return y, y * (logits_dot - jnp.sum(y * logits_dot, axis=-1, keepdims=True))


def _softmax_weights(
    logits: Array,
    bias: Optional[Array],
    dropout_rng: Optional[Array],
    dropout_rate: float,
    deterministic: bool,
    dtype: DType,
) -> Array:
  if bias is not None:
    logits = logits + bias.astype(logits.dtype)
  weights = attention_softmax(logits).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    weights = _attention_dropout(weights, dropout_rng, dropout_rate, dtype)
  return weights


ATTENTION_LAYOUTS = ('bhqd', 'bqhd')


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Optional[Array] = None,
    *,
    dropout_rng: Optional[Array] = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dtype: DType = jnp.float32,
    float32_logits: bool = False,
    layout: str = 'bhqd',
) -> Array:
  """T5 attention core: no `1/sqrt(d)` scaling; dropout on the weights broadcast over queries.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, heads, head_dim]`.
    value: `[batch, kv_len, heads, head_dim]`.
    bias: additive bias broadcastable to `[batch, heads, q_len, kv_len]`.
    dropout_rng: PRNG key for the attention-weight dropout.
    dropout_rate: dropout rate on the attention weights.
    deterministic: disables dropout.
    dtype: computation dtype.
    float32_logits: compute logits and softmax in float32.
    layout: the operand layout of the two batched products (`ATTENTION_LAYOUTS`): `'bqhd'` as
      flaxformer's einsums (`bqhd,bkhd->bhqk`, `bhqk,bkhd->bqhd`); `'bhqd'` moves the heads before
      the positions in query, key and value first (and back in the result), so that both products
      batch over their leading dimensions, which XLA:CPU splits over its threads better (the
      training step 0.96x the time on 2 threads, `benchmarks/ANALYSIS.md`). Equal up to float
      rounding.

  Returns:
    `[batch, q_len, heads, head_dim]`.
  """
  if float32_logits:
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
  if layout not in ATTENTION_LAYOUTS:
    raise ValueError(f'attention layout must be one of {ATTENTION_LAYOUTS}, got {layout!r}.')
  if layout == 'bqhd':
    attn_weights = jnp.einsum('bqhd,bkhd->bhqk', query, key)
  else:
    attn_weights = jnp.einsum('bhqd,bhkd->bhqk', _heads_first(query), _heads_first(key))
  attn_weights = _softmax_weights(
      attn_weights, bias, dropout_rng, dropout_rate, deterministic, dtype
  )
  value = value.astype(dtype)
  if layout == 'bqhd':
    return jnp.einsum('bhqk,bkhd->bqhd', attn_weights, value)
  return _heads_first(jnp.einsum('bhqk,bhkd->bhqd', attn_weights, _heads_first(value)))


def _heads_first(x: Array) -> Array:
  """`[batch, len, heads, head_dim]` <-> `[batch, heads, len, head_dim]`."""
  return x.transpose(0, 2, 1, 3)


def head_major_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Optional[Array] = None,
    *,
    dtype: DType = jnp.float32,
    float32_logits: bool = False,
) -> Array:
  """`dot_product_attention` over keys `[batch, heads, head_dim, kv_len]` and values `[batch,
  heads, kv_len, head_dim]`: the layouts the two batched matmuls read without a transpose (the
  encoder keys and values a decode keeps, see `MultiHeadDotProductAttention`). No dropout (only
  used when decoding).

  Returns:
    `[batch, q_len, heads, head_dim]`.
  """
  if float32_logits:
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
  attn_weights = jnp.einsum('bqhd,bhdk->bhqk', query, key)
  attn_weights = _softmax_weights(attn_weights, bias, None, 0.0, True, dtype)
  return jnp.einsum('bhqk,bhkd->bqhd', attn_weights, value.astype(dtype))


def single_query_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Optional[Array] = None,
    *,
    dtype: DType = jnp.float32,
    float32_logits: bool = False,
) -> Array:
  """`dot_product_attention` of one query per example, reading keys and values where they lie.

  A decoding step's query meets the whole cache `[batch, kv_len, heads, head_dim]`. The batched
  matmuls of `dot_product_attention` want the heads before the positions, so XLA would copy both
  caches into that layout at every step (a re-layout of the whole cache per token). Here the two
  products are element-wise multiplications reduced over `head_dim` and over the positions, which
  XLA fuses into single passes over the cache in its own layout. No dropout (decoding).

  Args:
    query: `[batch, 1, heads, head_dim]`.
    key: `[batch, kv_len, heads, head_dim]`.
    value: `[batch, kv_len, heads, head_dim]`.
    bias: additive bias broadcastable to `[batch, heads, 1, kv_len]`.
    dtype: computation dtype.
    float32_logits: compute logits and softmax in float32.

  Returns:
    `[batch, 1, heads, head_dim]`.
  """
  if float32_logits:
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
  logits = jnp.sum(query * key, axis=-1)  # [batch, kv_len, heads]
  logits = jnp.transpose(logits, (0, 2, 1))[:, :, None, :]  # [batch, heads, 1, kv_len]
  weights = _softmax_weights(logits, bias, None, 0.0, True, dtype)
  weights = jnp.transpose(weights[:, :, 0, :], (0, 2, 1))[..., None]  # [batch, kv_len, heads, 1]
  return jnp.sum(weights * value.astype(dtype), axis=1, keepdims=True)


def folded_cross_attention(
    query: Array,
    inputs_kv: Array,
    key_kernel: Array,
    value_kernel: Array,
    bias: Optional[Array] = None,
    *,
    dropout_rng: Optional[Array] = None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dtype: DType = jnp.float32,
    float32_logits: bool = False,
) -> Array:
  """Attention to `inputs_kv` with the key and value projections folded into the other factors.

  Per head h, with `e = inputs_kv`: `softmax(q (e Wk_h)^T) (e Wv_h) = softmax((q Wk_h^T) e^T)
  ((p e) Wv_h)`. The left side projects every one of the `kv_len` encoder positions (two
  `[kv_len, d] x [d, heads*head_dim]` matmuls per example); the right side multiplies only the
  `q_len` queries and weighted sums by the kernels, and contracts over `d` instead of `head_dim`
  in the two attention products. For a decoder of `q_len` targets much shorter than the encoder
  (T5's classification and short-answer targets) that is several times fewer FLOPs, forward and
  backward (`cross_attention_fold_saves`). Mathematically equal; float rounding differs (the sums
  are associated differently).

  Args:
    query: `[batch, q_len, heads, head_dim]`, projected.
    inputs_kv: `[batch, kv_len, d]`, not projected.
    key_kernel: `[d, heads * head_dim]`.
    value_kernel: `[d, heads * head_dim]`.
    bias: additive bias broadcastable to `[batch, heads, q_len, kv_len]`.
    dropout_rng: PRNG key for the attention-weight dropout.
    dropout_rate: dropout rate on the attention weights.
    deterministic: disables dropout.
    dtype: computation dtype.
    float32_logits: compute logits and softmax in float32.

  Returns:
    `[batch, q_len, heads, head_dim]`.
  """
  heads, head_dim = query.shape[-2:]
  d = inputs_kv.shape[-1]
  wk = key_kernel.reshape(d, heads, head_dim)
  wv = value_kernel.reshape(d, heads, head_dim).astype(dtype)
  e = jnp.asarray(inputs_kv, dtype)
  e_logits = e
  if float32_logits:
    query, wk, e_logits = (a.astype(jnp.float32) for a in (query, wk, e))
  qk = jnp.einsum('bqhk,dhk->bhqd', query, wk)
  attn_weights = jnp.einsum('bhqd,bld->bhql', qk, e_logits)
  attn_weights = _softmax_weights(
      attn_weights, bias, dropout_rng, dropout_rate, deterministic, dtype
  )
  weighted = jnp.einsum('bhql,bld->bhqd', attn_weights, e)
  return jnp.einsum('bhqd,dhk->bqhk', weighted, wv)


def cross_attention_fold_saves(
    q_len: int, kv_len: int, features: int, num_heads: int, head_dim: int
) -> bool:
  """Whether `folded_cross_attention` takes at most half the FLOPs of projecting keys and values.

  Per example and layer, forward (the backward pass scales alike): projecting is `4 kv_len d hD`
  for the two kernels plus `4 q_len kv_len hD` for the two attention products; folding is
  `4 q_len d hD` for the query and output sides plus `4 h q_len kv_len d` for the attention
  products. The folded products are batched matmuls far smaller than the projections, so they run
  at a lower FLOP rate; the factor 2 keeps the fold to shapes where it clearly wins (T5 small:
  decoders up to ~25 positions against a 228-position encoder).
  """
  inner = num_heads * head_dim
  project = 4 * kv_len * features * inner + 4 * q_len * kv_len * inner
  fold = 4 * q_len * features * inner + 4 * num_heads * q_len * kv_len * features
  return 2 * fold <= project


# The variable collection holding, per cross-attention, the keys and values of the encoder output
# for one decode (`MultiHeadDotProductAttention`, `encoded_kv_cache=True`).
ENCODED_KV = 'encoded_kv'


def _mask_with_prefix(mask: Optional[Array], num_prefix: int) -> Optional[Array]:
  """Extends a boolean mask `[..., k]` by `num_prefix` visible columns in front."""
  if mask is None or not num_prefix:
    return mask
  visible = jnp.ones(mask.shape[:-1] + (num_prefix,), bool)
  return jnp.concatenate([visible, mask.astype(bool)], axis=-1)


class MultiHeadDotProductAttention(nn.Module):
  """flaxformer multi-head attention with 2-D kernels and an autoregressive KV cache.

  Cache variables (collection `cache`): `cached_key`, `cached_value` `[batch, max_len, heads,
  head_dim]` and `cache_index` (scalar int32). With `decode=True` and an initialized cache, a call
  may carry a chunk of `n >= 1` query tokens: their keys/values are written at
  `[cache_index, cache_index + n)`, each query attends to every earlier cached position and
  causally inside the chunk (or as `chunk_mask` additionally allows), and `cache_index` advances by
  `n`. When the cache does not exist yet (the `init` call), it is created with length
  `max_decode_length` (default: the input length) and left empty.

  Cross-attention while decoding (`encoded_kv_cache=True`): the keys and values of the encoder
  output are the same at every step. When the collection `encoded_kv` is mutable, the call stores
  them there (`key` `[batch, heads, head_dim, kv_len]`, `value` `[batch, heads, kv_len,
  head_dim]`: the layouts the attention products read directly, hooks and prefix applied); when it
  holds them, the call uses them instead of projecting `inputs_kv`. A decode loop thus projects
  the encoder output once (`models.EncoderDecoderModel.predict_batch_with_aux`).

  The parameters are flaxformer's (`query`, `key`, `value`, `out`, each a 2-D `kernel`), and how
  they are applied never changes them:

  * `fuse_kernels`: self-attention multiplies its input once by the query, key and value kernels
    side by side (`fused_dense`), cross-attention the encoder output by the key and value kernels.
  * `fold_cross_attention`: a cross-attention over many more keys than queries, with no hooks on
    its keys and values, folds the key and value projections into the query and the attention
    weights (`folded_cross_attention`), when that saves at least half the FLOPs.

  Hooks (`hooks.attention(site)`, see `hooks.py`) transform the projected keys and values before
  they are cached, and may add prefix keys/values, which every query sees and which are never
  cached. Dense hooks reach the `query`, `key`, `value` and `out` kernels (on their slice of a
  fused product).

  Attributes:
    num_heads: heads.
    head_dim: width of one head.
    dtype: computation dtype.
    dropout_rate: dropout on the attention weights.
    float32_logits: logits and softmax in float32.
    kernel_init: initializer of the projection kernels.
    hooks: the methods' hooks, or None.
    site: this attention's site (`hooks.Site`), needed with `hooks`.
    fuse_kernels: one matmul for the projections of the same input.
    fold_cross_attention: fold the cross-attention key/value projections where it saves FLOPs.
    attention_layout: the layout of `dot_product_attention`'s products (`ATTENTION_LAYOUTS`).
  """

  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  kernel_init: Initializer = attention_kernel_init
  hooks: Optional[hooks_lib.Hooks] = None
  site: Optional[hooks_lib.Site] = None
  fuse_kernels: bool = True
  fold_cross_attention: bool = True
  attention_layout: str = 'bhqd'

  @nn.compact
  def __call__(
      self,
      inputs_q: Array,
      inputs_kv: Array,
      mask: Optional[Array] = None,
      bias: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
      chunk_mask: Optional[Array] = None,
      ctx: Optional[hooks_lib.Context] = None,
      bias_offset: int = 0,
      encoded_kv_cache: bool = False,
  ) -> Array:
    """Applies attention.

    Args:
      inputs_q: `[batch, q_len, d_model]`.
      inputs_kv: `[batch, kv_len, d_model]`; the same array as `inputs_q` for self-attention.
      mask: boolean attention mask `[batch, 1, q_len, kv_len]` (None: attend everywhere).
      bias: additive bias, e.g. relative positions `[1, heads, bias_offset + q_len, bias_offset +
        kv_len]`; in decode mode the full `[1, heads, bias_offset + max_len, bias_offset +
        max_len]` bias whose rows are sliced at the cache index.
      enable_dropout: enables dropout on the attention weights.
      decode: use and update the KV cache (self-attention only).
      max_decode_length: cache length when the cache is created.
      chunk_mask: decode mode only; boolean `[batch, 1, n, n]` of extra allowed pairs inside the
        chunk (ORed with the causal mask), e.g. bidirectional prefix-LM attention.
      ctx: what hooks may read (`hooks.Context`).
      bias_offset: the number of prefix positions the stack's `bias` has room for before the
        first token (the largest prefix of its layers); this attention's own `P` prefix keys
        take the last `P` of them.
      encoded_kv_cache: cross-attention inside a decode: keep (or use) the keys and values of
        `inputs_kv` in the `encoded_kv` collection.

    Returns:
      `[batch, q_len, d_model]`.
    """
    dtype = to_dtype(self.dtype)
    features = inputs_q.shape[-1]
    inner = self.num_heads * self.head_dim
    head_dim = self.head_dim
    ctx = hooks_lib.Context(decode=decode) if ctx is None else ctx
    site = self.site

    def dense(out_features, axes, init, name):
      return DenseGeneral(
          out_features,
          axes,
          dtype=dtype,
          kernel_init=init,
          hooks=self.hooks,
          site=None if site is None else site.with_kernel(name),
          name=name,
      )

    def query_init(rng, shape, init_dtype=jnp.float32):
      return self.kernel_init(rng, shape, init_dtype) / np.sqrt(head_dim).astype(np.float32)

    def split_heads(y):
      y = y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))
      return with_sharding_constraint(y, ('batch', 'length', 'heads', 'kv'))

    def output(x):
      x = x.reshape(x.shape[:-2] + (inner,))
      out = dense(features, ('joined_kv', 'embed'), self.kernel_init, 'out')(x, ctx)
      return with_sharding_constraint(out, ('batch', 'length', 'embed'))

    query_dense = dense(inner, ('embed', 'joined_kv'), query_init, 'query')
    key_dense = dense(inner, ('embed', 'joined_kv'), self.kernel_init, 'key')
    value_dense = dense(inner, ('embed', 'joined_kv'), self.kernel_init, 'value')
    kv_hooks = hooks_lib.build(self.hooks, 'attention', site) if self.hooks is not None else ()
    dropout_rng = None
    deterministic = not enable_dropout or self.dropout_rate == 0.0

    if inputs_kv is inputs_q:
      q, k, v = fused_dense((query_dense, key_dense, value_dense), inputs_q, ctx, self.fuse_kernels)
      query, key, value = split_heads(q), split_heads(k), split_heads(v)
    else:
      query = split_heads(query_dense(inputs_q, ctx))
      if encoded_kv_cache and self.has_variable(ENCODED_KV, 'key'):
        # A decoding step: the encoder's keys and values were projected once for the decode.
        key = self.get_variable(ENCODED_KV, 'key')
        value = self.get_variable(ENCODED_KV, 'value')
        if bias is not None:
          raise ValueError('A cross-attention with cached encoder keys takes no bias.')
        mask = _mask_with_prefix(mask, key.shape[-1] - inputs_kv.shape[1])
        x = head_major_attention(
            query,
            key,
            value,
            masks_lib.mask_to_bias(mask, dtype),
            dtype=dtype,
            float32_logits=self.float32_logits,
        )
        return output(x)
      if (
          self.fold_cross_attention
          and not encoded_kv_cache
          and not kv_hooks
          and cross_attention_fold_saves(
              inputs_q.shape[1], inputs_kv.shape[1], inputs_kv.shape[-1], self.num_heads, head_dim
          )
      ):
        key_kernel, key_hooked = key_dense(inputs_kv, kernel_only=True)
        value_kernel, value_hooked = value_dense(inputs_kv, kernel_only=True)
        if not (key_hooked or value_hooked):
          attention_bias = masks_lib.mask_to_bias(mask, dtype)
          if bias is not None:
            attention_bias = bias if attention_bias is None else attention_bias + bias.astype(dtype)
          if not deterministic:
            dropout_rng = self.make_rng('dropout')
          x = folded_cross_attention(
              query,
              inputs_kv,
              key_kernel,
              value_kernel,
              attention_bias,
              dropout_rng=dropout_rng,
              dropout_rate=self.dropout_rate,
              deterministic=deterministic,
              dtype=dtype,
              float32_logits=self.float32_logits,
          )
          return output(x)
      k, v = fused_dense((key_dense, value_dense), inputs_kv, ctx, self.fuse_kernels)
      key, value = split_heads(k), split_heads(v)

    for hook in kv_hooks:
      key, value = hook(key, value, ctx)
    prefix = hooks_lib.prefix_of(kv_hooks, query.shape[0], ctx) if kv_hooks else None
    num_prefix = 0 if prefix is None else prefix[0].shape[1]
    if num_prefix > bias_offset and bias is not None:
      raise ValueError(
          f'The attention hooks at {site.path if site else "an attention"} add {num_prefix} prefix '
          f'keys but the stack made room for {bias_offset} in the relative-position bias: the '
          "Hooks object's prefix_length(site) must report the prefix length of its attention hooks."
      )
    bias_cols = bias_offset - num_prefix

    if decode:
      batch, n = query.shape[0], query.shape[1]
      is_initialized = self.has_variable('cache', 'cached_key')
      cache_len = max_decode_length or key.shape[1]
      cache_shape = (key.shape[0], cache_len, self.num_heads, self.head_dim)
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, cache_shape, key.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, cache_shape, value.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, dtype=jnp.int32))
      if is_initialized:
        cache_len = cached_key.value.shape[1]
        if cached_key.value.shape[0] != batch or n > cache_len:
          raise ValueError(
              f'Decode chunk of shape {query.shape[:2]} does not fit the cache of shape '
              f'{cached_key.value.shape[:2]} (batch, max_decode_length).'
          )
        idx = cache_index.value
        key = lax.dynamic_update_slice(
            cached_key.value, key.astype(cached_key.value.dtype), (0, idx, 0, 0)
        )
        value = lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), (0, idx, 0, 0)
        )
        cached_key.value = key
        cached_value.value = value
        cache_index.value = idx + n
        q_pos = idx + jnp.arange(n)[:, None]
        k_pos = jnp.arange(cache_len)[None, :]
        allowed = jnp.broadcast_to((k_pos <= q_pos)[None, None], (batch, 1, n, cache_len))
        if chunk_mask is not None:
          extra = lax.dynamic_update_slice(
              jnp.zeros((batch, 1, n, cache_len), bool),
              jnp.broadcast_to(chunk_mask, (batch, 1, n, n)).astype(bool),
              (0, 0, 0, idx),
          )
          allowed = allowed | extra
        mask = masks_lib.combine_masks(mask, allowed)
        if bias is not None:
          bias = lax.dynamic_slice_in_dim(bias, idx + bias_offset, n, axis=-2)
          if bias_cols:
            bias = bias[..., bias_cols:]
      else:
        # Cache creation pass (`init`): plain causal attention over the given chunk.
        causal = masks_lib.make_causal_mask(n)
        if chunk_mask is not None:
          causal = causal | chunk_mask.astype(bool)
        mask = masks_lib.combine_masks(mask, causal)
        if bias is not None:
          bias = bias[..., bias_offset : bias_offset + n, bias_cols : bias_offset + key.shape[1]]
    elif bias is not None and bias_offset:
      bias = bias[..., bias_offset:, bias_cols:]

    if prefix is not None:
      # Prefix keys/values (never cached) go before the keys; every query sees them.
      key = jnp.concatenate([prefix[0].astype(key.dtype), key], axis=1)
      value = jnp.concatenate([prefix[1].astype(value.dtype), value], axis=1)
      mask = _mask_with_prefix(mask, num_prefix)

    if encoded_kv_cache and self.is_mutable_collection(ENCODED_KV):
      # The first call of a decode: keep the encoder's keys and values for the following steps.
      self.put_variable(ENCODED_KV, 'key', jnp.transpose(key, (0, 2, 3, 1)))
      self.put_variable(ENCODED_KV, 'value', jnp.transpose(value, (0, 2, 1, 3)))

    attention_bias = masks_lib.mask_to_bias(mask, dtype)
    if bias is not None:
      attention_bias = bias if attention_bias is None else attention_bias + bias.astype(dtype)

    if not deterministic:
      dropout_rng = self.make_rng('dropout')

    if decode and deterministic and query.shape[1] == 1 and prefix is None:
      # One new token against the cache: no re-layout of the cache (`single_query_attention`).
      x = single_query_attention(
          query,
          key,
          value,
          attention_bias,
          dtype=dtype,
          float32_logits=self.float32_logits,
      )
      return output(x)
    x = dot_product_attention(
        query,
        key,
        value,
        attention_bias,
        dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate,
        deterministic=deterministic,
        dtype=dtype,
        float32_logits=self.float32_logits,
        layout=self.attention_layout,
    )
    return output(x)


_ACTIVATIONS = {
    'linear': lambda x: x,
    'relu': nn.relu,
    'gelu': nn.gelu,  # tanh approximation, = HF `gelu_new`
    'gelu_new': nn.gelu,
    'gelu_exact': functools.partial(nn.gelu, approximate=False),
    'silu': nn.silu,
    'swish': nn.silu,
    'tanh': jnp.tanh,
    'sigmoid': nn.sigmoid,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  """Activation function by flaxformer name (`'relu'`, `'gelu'` (tanh approx.), `'linear'`...)."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'Unknown MLP activation {name!r}; known: {sorted(_ACTIVATIONS)}') from None


class MlpBlock(nn.Module):
  """T5 feed-forward block: `wo(dropout(hooks(prod_i act_i(wi_i(x)))))`.

  One activation (T5 1.0 `('relu',)`) names the input kernel `wi`; several (T5 1.1
  `('gelu', 'linear')`, gated GELU) name them `wi_0`, `wi_1`, .... `hooks.mlp_intermediate(site)`
  modules rescale or transform the intermediate activations; dense hooks reach every kernel (on
  their slice of a fused product).

  With `fuse_kernels`, the input kernels `wi_0`, `wi_1`, ... are applied as one matmul over the
  kernels side by side (`fused_dense`); the parameters stay separate.
  """

  intermediate_dim: int
  activations: Sequence[str] = ('relu',)
  dtype: DType = jnp.float32
  intermediate_dropout_rate: float = 0.0
  kernel_init: Initializer = default_kernel_init
  hooks: Optional[hooks_lib.Hooks] = None
  site: Optional[hooks_lib.Site] = None
  fuse_kernels: bool = True

  @nn.compact
  def __call__(
      self,
      inputs: Array,
      enable_dropout: bool = True,
      ctx: Optional[hooks_lib.Context] = None,
  ) -> Array:
    dtype = to_dtype(self.dtype)
    ctx = hooks_lib.Context() if ctx is None else ctx

    def dense(out_features, axes, name):
      return DenseGeneral(
          out_features,
          axes,
          dtype=dtype,
          kernel_init=self.kernel_init,
          hooks=self.hooks,
          site=None if self.site is None else self.site.with_kernel(name),
          name=name,
      )

    names = (
        ['wi'] if len(self.activations) == 1 else [f'wi_{i}' for i in range(len(self.activations))]
    )
    products = fused_dense(
        [dense(self.intermediate_dim, ('embed', 'mlp'), name) for name in names],
        inputs,
        ctx,
        self.fuse_kernels,
    )
    hidden = [get_activation(act)(h) for act, h in zip(self.activations, products)]
    x = functools.reduce(operator.mul, hidden)
    for hook in hooks_lib.build(self.hooks, 'mlp_intermediate', self.site):
      x = hook(x, ctx)
    x = with_sharding_constraint(x, ('batch', 'length', 'mlp'))
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=not enable_dropout
    )
    out = dense(inputs.shape[-1], ('mlp', 'embed'), 'wo')(x, ctx)
    return with_sharding_constraint(out, ('batch', 'length', 'embed'))
