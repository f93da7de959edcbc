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
from typing import Any, Callable, Optional, Sequence, Tuple

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
  def __call__(self, inputs: Array, ctx: Optional[hooks_lib.Context] = None) -> Array:
    dtype = to_dtype(self.dtype)
    kernel = param_with_axes(
        'kernel',
        self.kernel_init,
        (inputs.shape[-1], self.features),
        jnp.float32,
        axes=self.kernel_axes,
    )
    kernel = jnp.asarray(kernel, dtype)
    inputs = jnp.asarray(inputs, dtype)
    y = lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())))
    if self.hooks is not None and self.site is not None:
      ctx = hooks_lib.Context() if ctx is None else ctx
      for hook in hooks_lib.build(self.hooks, 'dense', self.site):
        y = hook(inputs, y, ctx)
    return y


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

  Returns:
    `[batch, q_len, heads, head_dim]`.
  """
  if float32_logits:
    query = query.astype(jnp.float32)
    key = key.astype(jnp.float32)
  attn_weights = jnp.einsum('bqhd,bkhd->bhqk', query, key)
  if bias is not None:
    attn_weights = attn_weights + bias.astype(attn_weights.dtype)
  attn_weights = jax.nn.softmax(attn_weights).astype(dtype)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    dropout_shape = list(attn_weights.shape)
    dropout_shape[-2] = 1
    keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
    keep = jnp.broadcast_to(keep, attn_weights.shape)
    multiplier = keep.astype(attn_weights.dtype) / jnp.asarray(keep_prob, dtype=dtype)
    attn_weights = attn_weights * multiplier
  return jnp.einsum('bhqk,bkhd->bqhd', attn_weights, value.astype(dtype))


class MultiHeadDotProductAttention(nn.Module):
  """flaxformer multi-head attention with 2-D kernels and an autoregressive KV cache.

  Cache variables (collection `cache`): `cached_key`, `cached_value` `[batch, max_len, heads,
  head_dim]` and `cache_index` (scalar int32). With `decode=True` and an initialized cache, a call
  may carry a chunk of `n >= 1` query tokens: their keys/values are written at
  `[cache_index, cache_index + n)`, each query attends to every earlier cached position and
  causally inside the chunk (or as `chunk_mask` additionally allows), and `cache_index` advances by
  `n`. When the cache does not exist yet (the `init` call), it is created with length
  `max_decode_length` (default: the input length) and left empty.

  Hooks (`hooks.attention(site)`, see `hooks.py`) transform the projected keys and values before
  they are cached, and may add prefix keys/values, which every query sees and which are never
  cached. Dense hooks reach the `query`, `key`, `value` and `out` kernels.

  Attributes:
    num_heads: heads.
    head_dim: width of one head.
    dtype: computation dtype.
    dropout_rate: dropout on the attention weights.
    float32_logits: logits and softmax in float32.
    kernel_init: initializer of the projection kernels.
    hooks: the methods' hooks, or None.
    site: this attention's site (`hooks.Site`), needed with `hooks`.
  """

  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.0
  float32_logits: bool = False
  kernel_init: Initializer = attention_kernel_init
  hooks: Optional[hooks_lib.Hooks] = None
  site: Optional[hooks_lib.Site] = None

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
  ) -> Array:
    """Applies attention.

    Args:
      inputs_q: `[batch, q_len, d_model]`.
      inputs_kv: `[batch, kv_len, d_model]`.
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

    def project(name, init, x):
      y = dense(inner, ('embed', 'joined_kv'), init, name)(x, ctx)
      y = y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))
      return with_sharding_constraint(y, ('batch', 'length', 'heads', 'kv'))

    query = project('query', query_init, inputs_q)
    key = project('key', self.kernel_init, inputs_kv)
    value = project('value', self.kernel_init, inputs_kv)
    kv_hooks = hooks_lib.build(self.hooks, 'attention', site) if self.hooks is not None else ()
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
      if mask is not None:
        visible = jnp.ones(mask.shape[:-1] + (num_prefix,), bool)
        mask = jnp.concatenate(
            [jnp.broadcast_to(visible, mask.shape[:-1] + (num_prefix,)), mask.astype(bool)], axis=-1
        )

    attention_bias = masks_lib.mask_to_bias(mask, dtype)
    if bias is not None:
      attention_bias = bias if attention_bias is None else attention_bias + bias.astype(dtype)

    dropout_rng = None
    deterministic = not enable_dropout or self.dropout_rate == 0.0
    if not deterministic:
      dropout_rng = self.make_rng('dropout')

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
    )
    x = x.reshape(x.shape[:-2] + (inner,))
    out = dense(features, ('joined_kv', 'embed'), self.kernel_init, 'out')(x, ctx)
    return with_sharding_constraint(out, ('batch', 'length', 'embed'))


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
  modules rescale or transform the intermediate activations; dense hooks reach every kernel.
  """

  intermediate_dim: int
  activations: Sequence[str] = ('relu',)
  dtype: DType = jnp.float32
  intermediate_dropout_rate: float = 0.0
  kernel_init: Initializer = default_kernel_init
  hooks: Optional[hooks_lib.Hooks] = None
  site: Optional[hooks_lib.Site] = None

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

    hidden = []
    for i, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{i}'
      h = dense(self.intermediate_dim, ('embed', 'mlp'), name)(inputs, ctx)
      hidden.append(get_activation(act)(h))
    x = functools.reduce(operator.mul, hidden)
    for hook in hooks_lib.build(self.hooks, 'mlp_intermediate', self.site):
      x = hook(x, ctx)
    x = with_sharding_constraint(x, ('batch', 'length', 'mlp'))
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=not enable_dropout
    )
    out = dense(inputs.shape[-1], ('mlp', 'embed'), 'wo')(x, ctx)
    return with_sharding_constraint(out, ('batch', 'length', 'embed'))
