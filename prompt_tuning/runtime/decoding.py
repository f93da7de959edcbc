"""Fast autoregressive decoding with T5X-compatible names and semantics.

This module provides the decoding functions that `EncoderDecoderModel` /
`DecoderOnlyModel` hand to their `decode_fn` hook, with the argument names and
return conventions of `t5x.decoding`:

* `temperature_sample`: greedy decoding (`topk=1`, the default), top-k,
  nucleus (top-p) and plain temperature sampling, `num_decodes` samples per
  example, teacher forcing of non-zero `inputs` positions (prompts/prefixes)
  and decoding from a prefilled cache (`initial_index`).
* `beam_search`: beam search with T5X's brevity penalty
  `((5 + length) / 6) ** alpha`, early stopping, forced prefixes and prefilled
  caches.
* Beam helpers: `cache_map`, `add_beam_dim`, `flatten_beam_dim`,
  `unflatten_beam_dim`, `flat_batch_beam_expand`, `gather_beams`,
  `cache_gather_beams`, `gather_topk_beams`, `top_k_two_stage`,
  `brevity_penalty`.

Rank classification (scoring a fixed label set instead of decoding) is in
`prompt_tuning.runtime.rank_classification`.

Conventions (shared with T5X):

* `tokens_to_logits(DecodingState) -> (logits [batch * beams, vocab], cache)`.
  `DecodingState.cur_token` is `[batch * beams, 1]`.
* Token 0 is both padding and BOS: the first token fed to the decoder is 0
  (`inputs[:, 0]` is ignored unless `initial_index` is given).
* Every cache leaf has the batch on axis `cache_offset` (0, or 1 with scanned
  layers), except the leaves named `cache_index`, `cached_bias` and
  `position_embedder_index`, which are shared by all beams and left untouched
  by beam expansion and gathering (see `cache_map`).
* Results are sorted along the `num_decodes` axis by increasing score, so the
  best decode is the last one (`decodes[:, -1]`).
"""

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import flax
from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Array = Union[jnp.ndarray, np.ndarray]

# "Effective negative infinity" used to mask candidates. Finite on purpose:
# arithmetic on it (sums, one-hot contractions) never produces NaNs.
NEG_INF_VALUE = -1.0e7
NEG_INF = np.array(NEG_INF_VALUE, dtype=np.float32)

# Temperatures at or below this are treated as 0 (greedy decoding).
MIN_TEMPERATURE = np.array(1e-4, dtype=np.float32)

# Cache leaves that carry no batch axis and are shared by all beams/decodes.
SHARED_CACHE_LEAF_NAMES = ('cache_index', 'cached_bias', 'position_embedder_index')


def _is_tracer(value: Any) -> bool:
  """Whether `value` is a JAX tracer (its value is unknown at trace time)."""
  return isinstance(value, jax.core.Tracer)


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` receives at every decoding step.

  Decodes of one batch element are contiguous in the flattened batch axis
  (row `b * beams + j` is decode `j` of example `b`).

  Attributes:
    cur_index: position of the decoding loop: `[batch * num_decodes]` int32 in
      `temperature_sample`, a scalar int32 in `beam_search` (as in T5X).
    sequences: `[batch * num_decodes, length]` int32 tokens decoded so far
      (including forced prefix tokens).
    cur_token: `[batch * num_decodes, 1]` int32, the token to feed now.
    cache: the (beam-flattened) autoregressive cache.
  """

  cur_index: jnp.ndarray
  sequences: jnp.ndarray
  cur_token: jnp.ndarray
  cache: Mapping[str, jnp.ndarray]


TokensToLogitsFn = Callable[[DecodingState], Tuple[jnp.ndarray, PyTree]]


# ------------------------------------------------------------------------------
# Beam / cache helpers.
# ------------------------------------------------------------------------------


def cache_map(
    fn: Callable[[jnp.ndarray], jnp.ndarray], cache: PyTree, apply_to_index: bool = False
) -> PyTree:
  """Maps `fn` over the batch-carrying leaves of a (nested dict) cache.

  Leaves named `cached_bias` or `position_embedder_index` are never mapped;
  leaves named `cache_index` are mapped only when `apply_to_index` is True and
  they are not scalars (a per-example index, as used with a prefilled cache).
  All other leaves are passed to `fn`. `FrozenDict`s stay frozen.

  Args:
    fn: function applied to each mapped leaf.
    cache: nested mapping of arrays (may be empty or None).
    apply_to_index: whether to also map non-scalar `cache_index` leaves.

  Returns:
    A cache of the same structure with the mapped leaves replaced.
  """
  if cache is None:
    return None
  frozen = isinstance(cache, flax.core.FrozenDict)
  if frozen:
    cache = flax.core.unfreeze(cache)
  if not isinstance(cache, Mapping):
    raise TypeError(f'cache must be a (nested) mapping, got {type(cache)}.')
  if not cache:
    return flax.core.freeze(cache) if frozen else cache
  flat = traverse_util.flatten_dict(dict(cache))
  new_flat = {}
  for key, value in flat.items():
    name = key[-1]
    if name in ('cached_bias', 'position_embedder_index'):
      new_flat[key] = value
    elif name == 'cache_index':
      if apply_to_index and jnp.ndim(value) > 0:
        new_flat[key] = fn(value)
      else:
        new_flat[key] = value
    else:
      new_flat[key] = fn(value)
  new_cache = traverse_util.unflatten_dict(new_flat)
  return flax.core.freeze(new_cache) if frozen else new_cache


def add_beam_dim(x: Array, beam_size: int, offset: int = 0) -> jnp.ndarray:
  """Inserts a beam axis after the batch axis (`offset`) and tiles into it.

  `[..., batch, ...] -> [..., batch, beam_size, ...]`. Scalars are returned
  unchanged.
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    return x
  x = jnp.expand_dims(x, axis=offset + 1)
  reps = [1] * x.ndim
  reps[offset + 1] = beam_size
  return jnp.tile(x, reps)


def flatten_beam_dim(x: Array, offset: int = 0) -> jnp.ndarray:
  """Merges batch and beam axes: `[batch, beam, ...] -> [batch*beam, ...]`."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    return x
  shape = list(x.shape)
  beam = shape.pop(offset + 1)
  shape[offset] *= beam
  return x.reshape(shape)


def unflatten_beam_dim(x: Array, batch_size: int, beam_size: int, offset: int = 0) -> jnp.ndarray:
  """Splits the flat batch axis: `[batch*beam, ...] -> [batch, beam, ...]`."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    return x
  if x.shape[offset] != batch_size * beam_size:
    raise ValueError(
        f'Axis {offset} of shape {x.shape} is not batch_size * beam_size = '
        f'{batch_size} * {beam_size}.'
    )
  shape = list(x.shape)
  new_shape = shape[:offset] + [batch_size, beam_size] + shape[offset + 1 :]
  return x.reshape(new_shape)


def flat_batch_beam_expand(x: Array, beam_size: int, offset: int = 0) -> jnp.ndarray:
  """Repeats each batch element `beam_size` times along the batch axis.

  `[batch, ...] -> [batch * beam_size, ...]` with the copies of one element
  contiguous (rows `b * beam_size ... b * beam_size + beam_size - 1`).
  """
  return flatten_beam_dim(add_beam_dim(x, beam_size, offset), offset)


def _gather_beam_axis(
    x: jnp.ndarray, beam_indices: jnp.ndarray, one_hot: bool, offset: int = 0
) -> jnp.ndarray:
  """Gathers `x[..., b, beam_indices[b, e], ...]` along the beam axis."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    return x
  if one_hot:
    old_beams = x.shape[offset + 1]
    oh = jax.nn.one_hot(beam_indices, old_beams, dtype=jnp.float32)
    moved = jnp.moveaxis(x, (offset, offset + 1), (0, 1))
    if jnp.issubdtype(moved.dtype, jnp.floating):
      out = jnp.einsum(
          'beo,bo...->be...', oh.astype(moved.dtype), moved, precision=lax.Precision.HIGHEST
      )
    else:
      out = jnp.einsum('beo,bo...->be...', oh.astype(jnp.int32), moved.astype(jnp.int32)).astype(
          moved.dtype
      )
    return jnp.moveaxis(out, (0, 1), (offset, offset + 1))
  idx_shape = [1] * offset + list(beam_indices.shape) + [1] * (x.ndim - offset - 2)
  idx = beam_indices.reshape(idx_shape)
  idx = jnp.broadcast_to(
      idx, x.shape[: offset + 1] + beam_indices.shape[1:] + x.shape[offset + 2 :]
  )
  return jnp.take_along_axis(x, idx, axis=offset + 1)


def gather_beams(
    nested: PyTree,
    beam_indices: jnp.ndarray,
    batch_size: int,
    old_beam_size: int,
    new_beam_size: int,
    one_hot: bool = True,
) -> PyTree:
  """Gathers beam slices: `[batch, old_beams, ...] -> [batch, new_beams, ...]`.

  Args:
    nested: pytree of `[batch, old_beam_size, ...]` arrays (scalars are kept).
    beam_indices: `[batch, new_beam_size]` int indices into the old beams.
    batch_size: batch size (checked against `beam_indices`).
    old_beam_size: size of the old beam axis.
    new_beam_size: size of the new beam axis.
    one_hot: gather by one-hot contraction (SPMD friendly; exact: float32 at
      HIGHEST precision, integers in int32) instead of direct indexing.

  Returns:
    The pytree with gathered arrays.
  """
  del old_beam_size
  if tuple(beam_indices.shape) != (batch_size, new_beam_size):
    raise ValueError(
        f'beam_indices has shape {beam_indices.shape}, expected ' f'{(batch_size, new_beam_size)}.'
    )
  return jax.tree_util.tree_map(lambda x: _gather_beam_axis(x, beam_indices, one_hot), nested)


def cache_gather_beams(
    nested: PyTree,
    beam_indices: jnp.ndarray,
    batch_size: int,
    old_beam_size: int,
    new_beam_size: int,
    one_hot: bool = True,
    offset: int = 0,
    apply_to_index: bool = False,
) -> PyTree:
  """`gather_beams` for a cache: skips shared leaves (see `cache_map`).

  Args:
    nested: cache with `[..., batch, old_beam_size, ...]` leaves, the batch on
      axis `offset`.
    beam_indices: `[batch, new_beam_size]` indices into the old beams.
    batch_size: batch size.
    old_beam_size: size of the old beam axis.
    new_beam_size: size of the new beam axis.
    one_hot: gather by one-hot contraction instead of direct indexing.
    offset: axis of the batch in the cache leaves (scanned layers).
    apply_to_index: also gather non-scalar `cache_index` leaves (whose batch
      axis is always 0).

  Returns:
    The cache with gathered leaves.
  """
  del old_beam_size
  if tuple(beam_indices.shape) != (batch_size, new_beam_size):
    raise ValueError(
        f'beam_indices has shape {beam_indices.shape}, expected ' f'{(batch_size, new_beam_size)}.'
    )
  return _cache_map_with_offset(
      lambda x, o: _gather_beam_axis(x, beam_indices, one_hot, o), nested, offset, apply_to_index
  )


def _cache_map_with_offset(
    fn: Callable[[jnp.ndarray, int], jnp.ndarray], cache: PyTree, offset: int, apply_to_index: bool
) -> PyTree:
  """`cache_map` where `cache_index` leaves always use batch axis 0.

  A per-example `cache_index` is `[batch]` even when the other cache leaves
  are stacked over scanned layers, so it must not be given `offset`.
  """
  if cache is None:
    return None
  frozen = isinstance(cache, flax.core.FrozenDict)
  if frozen:
    cache = flax.core.unfreeze(cache)
  if not cache:
    return flax.core.freeze(cache) if frozen else cache
  flat = traverse_util.flatten_dict(dict(cache))
  index_keys = {k for k in flat if k[-1] == 'cache_index'}
  mapped_other = cache_map(
      lambda x: fn(x, offset),
      traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in index_keys}),
  )
  new_flat = traverse_util.flatten_dict(mapped_other) if mapped_other else {}
  for k in index_keys:
    v = flat[k]
    new_flat[k] = fn(v, 0) if (apply_to_index and jnp.ndim(v) > 0) else v
  new_cache = traverse_util.unflatten_dict(new_flat)
  return flax.core.freeze(new_cache) if frozen else new_cache


def top_k_two_stage(x: jnp.ndarray, k: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """`lax.top_k` over the last axis of `[batch, n]` (T5X-compatible name).

  T5X splits large top-k's in two stages for TPU efficiency; the result is the
  same as a single `lax.top_k`, which is what this does.
  """
  return lax.top_k(x, k)


def gather_topk_beams(
    nested: PyTree, score_or_log_prob: jnp.ndarray, batch_size: int, new_beam_size: int
) -> PyTree:
  """Gathers the `new_beam_size` best beams, ordered by increasing score.

  Args:
    nested: pytree of `[batch, old_beams, ...]` arrays.
    score_or_log_prob: `[batch, old_beams]` values to rank by.
    batch_size: batch size.
    new_beam_size: how many beams to keep.

  Returns:
    The pytree restricted to the top beams, best last.
  """
  _, topk_indices = lax.top_k(score_or_log_prob, k=new_beam_size)
  topk_indices = jnp.flip(topk_indices, axis=1)
  return gather_beams(
      nested, topk_indices, batch_size, score_or_log_prob.shape[1], new_beam_size, one_hot=False
  )


def brevity_penalty(alpha: float, length: Union[int, jnp.ndarray]) -> jnp.ndarray:
  """T5X/GNMT length normalization `((5 + length) / 6) ** alpha`."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


# ------------------------------------------------------------------------------
# Logit masks for sampling.
# ------------------------------------------------------------------------------


def topk_mask(
    logits: jnp.ndarray, topk: Union[int, jnp.ndarray], replace_val: float = NEG_INF_VALUE
) -> jnp.ndarray:
  """Replaces logits below the `topk`-th largest (per row) by `replace_val`.

  Ties with the `topk`-th largest value are kept. `topk` may be a Python int
  (uses `lax.top_k`) or a traced scalar (uses a sort). `topk <= 0` keeps all.
  """
  vocab = logits.shape[-1]
  if not _is_tracer(topk):
    k = int(topk)
    if k <= 0 or k >= vocab:
      return logits
    kth = lax.top_k(logits, k)[0][..., -1:]
  else:
    k = jnp.clip(jnp.asarray(topk, jnp.int32), 1, vocab)
    sorted_desc = -jnp.sort(-logits, axis=-1)
    kth = lax.dynamic_slice_in_dim(sorted_desc, k - 1, 1, axis=-1)
    kth = jnp.where(topk > 0, kth, -jnp.inf)
  return jnp.where(logits < kth, jnp.asarray(replace_val, logits.dtype), logits)


def topp_mask(
    logits: jnp.ndarray, topp: Union[float, jnp.ndarray], replace_val: float = NEG_INF_VALUE
) -> jnp.ndarray:
  """Nucleus mask: keeps the smallest top set with cumulative prob >= `topp`.

  Tokens are taken in order of decreasing probability until their cumulative
  probability reaches `topp`; every token whose logit is below the last kept
  one is replaced by `replace_val` (ties with it are kept). `topp <= 0` keeps
  all tokens.
  """
  topp = jnp.asarray(topp, jnp.float32)
  sorted_desc = -jnp.sort(-logits, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_desc.astype(jnp.float32), axis=-1)
  cum_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  # The first (most probable) token is always kept.
  keep = cum_before < topp
  keep = keep.at[..., 0].set(True)
  num_keep = jnp.sum(keep, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(sorted_desc, num_keep - 1, axis=-1)
  masked = jnp.where(logits < threshold, jnp.asarray(replace_val, logits.dtype), logits)
  return jnp.where(topp > 0, masked, logits)


def _check_topk_topp(topk: Any, topp: Any) -> None:
  """Raises like T5X when both `topk` and `topp` are (statically) non-zero."""
  if not (_is_tracer(topk) or _is_tracer(topp)) and topk and topp:
    raise ValueError(
        'At most one of `topp` or `topk` may be non-zero '
        f'(got topk={topk}, topp={topp}); set topk=0 to use '
        'nucleus sampling.'
    )


# ------------------------------------------------------------------------------
# Temperature sampling.
# ------------------------------------------------------------------------------


@flax.struct.dataclass
class SamplingLoopState:
  """Loop state of `temperature_sample` (seen by `state_callback_fn`).

  Attributes:
    step: scalar int32 number of loop iterations done.
    cur_index: `[batch * num_decodes]` int32 loop position per row.
    sequences: `[batch * num_decodes, length + 2]` int32: position 0 is BOS,
      the last position is a scratch slot.
    cache: the autoregressive cache.
    cur_token: `[batch * num_decodes, 1]` int32 token to feed next.
    ended: `[batch * num_decodes, 1]` bool, rows that are finished.
    rng: PRNG key.
    log_prob: `[batch * num_decodes]` float32 accumulated log-probabilities.
  """

  step: jnp.ndarray
  cur_index: jnp.ndarray
  sequences: jnp.ndarray
  cache: PyTree
  cur_token: jnp.ndarray
  ended: jnp.ndarray
  rng: jnp.ndarray
  log_prob: jnp.ndarray


StateCallbackFn = Callable[[SamplingLoopState], SamplingLoopState]
LogitCallbackFn = Callable[[jnp.ndarray, SamplingLoopState], jnp.ndarray]


def _token_log_prob(log_probs: jnp.ndarray, tokens: jnp.ndarray) -> jnp.ndarray:
  """`log_probs[i, tokens[i]]` for `[n, vocab]`, `[n]`."""
  return jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def _sample_next(
    logits: jnp.ndarray,
    rng: jnp.ndarray,
    temperature: jnp.ndarray,
    topk: Any,
    topp: Any,
    rescale_log_probs: bool,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Draws one token per row; returns `(tokens [n], log_probs [n])`.

  `temperature` is a scalar or `[n]`; rows with temperature at or below
  `MIN_TEMPERATURE` are decoded greedily.
  """

  def greedy(logits: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rescale_log_probs:
      logp = jnp.zeros(token.shape, jnp.float32)
    else:
      logp = _token_log_prob(jax.nn.log_softmax(logits), token)
    return token, logp

  static_greedy = not _is_tracer(topk) and not _is_tracer(topp) and int(topk) == 1 and not topp
  if static_greedy:
    # top-1 sampling is argmax at any temperature (first index on ties).
    return greedy(logits)

  def sample(logits: jnp.ndarray, temperature: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    temp = jnp.maximum(temperature, MIN_TEMPERATURE)
    if temp.ndim == 1:
      temp = temp[:, None]
    scaled = logits / temp
    if _is_tracer(topk) or topk:
      scaled = topk_mask(scaled, topk)
    if _is_tracer(topp) or topp:
      scaled = topp_mask(scaled, topp)
    token = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    source = scaled if rescale_log_probs else logits
    logp = _token_log_prob(jax.nn.log_softmax(source), token)
    return token, logp

  if temperature.ndim == 0:
    return lax.cond(
        temperature > MIN_TEMPERATURE, lambda: sample(logits, temperature), lambda: greedy(logits)
    )
  sampled_token, sampled_logp = sample(logits, temperature)
  greedy_token, greedy_logp = greedy(logits)
  is_greedy = temperature <= MIN_TEMPERATURE
  return (
      jnp.where(is_greedy, greedy_token, sampled_token),
      jnp.where(is_greedy, greedy_logp, sampled_logp),
  )


def temperature_sample(
    inputs: Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogitsFn,
    eos_id: int,
    decode_rng: Optional[jnp.ndarray] = None,
    num_decodes: int = 1,
    temperature: Union[float, jnp.ndarray] = 1.0,
    topk: int = 1,
    topp: float = 0.0,
    cache_offset: int = 0,
    initial_index: Optional[jnp.ndarray] = None,
    max_decode_steps: Optional[Union[int, jnp.ndarray]] = None,
    max_decode_steps_hard_limit: Optional[int] = None,
    rescale_log_probs: bool = True,
    state_callback_fn: Optional[StateCallbackFn] = None,
    logit_callback_fn: Optional[LogitCallbackFn] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Samples `num_decodes` sequences per example (greedy by default).

  The decoding starts by feeding BOS (0), or `inputs[:, initial_index]` when
  `initial_index` is given (decoding from a cache prefilled with the prompt).
  A non-zero `inputs[:, i + 1]` is teacher-forced as output position `i`: the
  sampled token is discarded and its log-probability is not counted. The
  output position `i` is thus aligned with `inputs[:, i + 1]`, i.e. `inputs`
  is the shifted-right decoder input (`inputs = [0, 5, 6, 0]` forces outputs
  `[5, 6, x, y]`).

  Once a row generates `eos_id` (one more EOS than its prompt already
  contained), its later positions are 0 and its log-probability is frozen.
  The loop (`lax.while_loop`) stops when every row has ended, or reached its
  length limit; the function can be jitted (with static `tokens_to_logits`,
  `eos_id`, `num_decodes`, `topk`, `rescale_log_probs`).

  Args:
    inputs: `[batch, length]` int32 shifted-right decoder inputs; non-zero
      positions are forced. `length` is the maximum decode length.
    cache: autoregressive cache for `batch` rows (see module docstring).
    tokens_to_logits: `DecodingState -> (logits [batch * num_decodes, vocab],
      new_cache)`.
    eos_id: end-of-sequence token id.
    decode_rng: PRNG key (defaults to `PRNGKey(0)`).
    num_decodes: samples per example; the batch (and cache) is expanded to
      `batch * num_decodes` rows.
    temperature: scalar, or `[batch]` per-example temperatures. At or below
      `MIN_TEMPERATURE` decoding is greedy.
    topk: if > 0 sample among the `topk` most likely tokens only (`1` is
      greedy, the default); 0 disables.
    topp: if > 0, nucleus sampling among the smallest set of most likely
      tokens whose probabilities sum to at least `topp`. Requires `topk=0`.
    cache_offset: axis of the batch in cache leaves (1 for scanned layers).
    initial_index: optional `[batch]` int32 position to start decoding at; the
      cache must already hold positions `< initial_index` and its
      `cache_index` be a `[batch]` vector.
    max_decode_steps: optional maximum number of generated (non-forced)
      tokens per row; each row may then hold at most
      `count_nonzero(inputs) + max_decode_steps` tokens.
    max_decode_steps_hard_limit: optional static cap on `max_decode_steps`.
    rescale_log_probs: if True the returned log-probs are those of the
      distribution actually sampled from (after temperature, top-k, top-p; 0
      for greedy); otherwise of the raw model distribution.
    state_callback_fn: optional `SamplingLoopState -> SamplingLoopState`
      applied before each step and to the final state.
    logit_callback_fn: optional `(logits, SamplingLoopState) -> logits`
      applied to the logits before sampling.

  Returns:
    `(decodes [batch, num_decodes, length] int32, log_probs [batch,
    num_decodes] float32)`, sorted along axis 1 by increasing log-prob (the
    most likely sample is last).

  Raises:
    ValueError: if both `topk` and `topp` are non-zero, or `max_decode_steps`
      exceeds the length of `inputs`.
  """
  _check_topk_topp(topk, topp)
  if num_decodes < 1:
    raise ValueError(f'num_decodes must be >= 1, got {num_decodes}.')
  if decode_rng is None:
    decode_rng = jax.random.PRNGKey(0)
  if (
      max_decode_steps_hard_limit is not None
      and max_decode_steps_hard_limit > 0
      and max_decode_steps is not None
  ):
    max_decode_steps = jnp.minimum(max_decode_steps, max_decode_steps_hard_limit)

  inputs = jnp.asarray(inputs).astype(jnp.int32)
  batch_size = inputs.shape[0]
  temperature = jnp.asarray(temperature, jnp.float32)
  if temperature.ndim > 1:
    raise ValueError(
        'temperature must be a scalar or a [batch] vector, got ' f'shape {temperature.shape}.'
    )

  if num_decodes > 1:
    inputs = flat_batch_beam_expand(inputs, num_decodes)
    cache = _cache_map_with_offset(
        lambda x, o: flat_batch_beam_expand(x, num_decodes, o),
        cache,
        cache_offset,
        apply_to_index=initial_index is not None,
    )
    if initial_index is not None:
      initial_index = flat_batch_beam_expand(jnp.asarray(initial_index), num_decodes)
    if temperature.ndim == 1:
      temperature = jnp.repeat(temperature, num_decodes)

  sequences, log_prob = _temperature_sample_single_trial(
      inputs,
      cache,
      tokens_to_logits,
      eos_id,
      decode_rng,
      temperature,
      topk,
      topp,
      initial_index,
      max_decode_steps,
      rescale_log_probs,
      state_callback_fn,
      logit_callback_fn,
  )

  sequences = unflatten_beam_dim(sequences, batch_size, num_decodes)
  log_prob = unflatten_beam_dim(log_prob, batch_size, num_decodes)
  order = jnp.argsort(log_prob, axis=-1)
  sequences = jnp.take_along_axis(sequences, order[:, :, None], axis=1)
  log_prob = jnp.take_along_axis(log_prob, order, axis=1)
  return sequences, log_prob


def _temperature_sample_single_trial(
    inputs: jnp.ndarray,
    cache: PyTree,
    tokens_to_logits: TokensToLogitsFn,
    eos_id: int,
    rng: jnp.ndarray,
    temperature: jnp.ndarray,
    topk: Any,
    topp: Any,
    initial_index: Optional[jnp.ndarray],
    max_decode_steps: Optional[Union[int, jnp.ndarray]],
    rescale_log_probs: bool,
    state_callback_fn: Optional[StateCallbackFn],
    logit_callback_fn: Optional[LogitCallbackFn],
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Samples one sequence per (already expanded) row; see `temperature_sample`.

  Returns:
    `(sequences [rows, length], log_prob [rows])`, unsorted.
  """
  rows, length = inputs.shape
  if max_decode_steps is not None:
    if not _is_tracer(max_decode_steps) and np.any(np.asarray(max_decode_steps) > length):
      raise ValueError(
          f'max_decode_steps={max_decode_steps} exceeds the decode length '
          f'{length} (inputs.shape[1]).'
      )
    # Tokens each row may hold: its forced prompt plus `max_decode_steps`.
    max_len = jnp.minimum(
        length, jnp.sum(inputs != 0, axis=1) + jnp.asarray(max_decode_steps, jnp.int32)
    )
  else:
    max_len = jnp.full((rows,), length, jnp.int32)
  max_len = max_len.astype(jnp.int32)

  # Position 0: BOS. Positions 1..length: outputs (forced where non-zero).
  # Position length + 1: scratch slot that rows already at their limit keep
  # overwriting while other rows (started at a smaller index) finish.
  sequences0 = jnp.pad(inputs, ((0, 0), (0, 2)))
  if initial_index is None:
    index0 = jnp.zeros((rows,), jnp.int32)
    token0 = jnp.zeros((rows, 1), jnp.int32)
  else:
    index0 = jnp.asarray(initial_index, jnp.int32).reshape((rows,))
    token0 = jnp.take_along_axis(sequences0, index0[:, None], axis=1)
  # Rows whose prompt already contains EOS end at the first *additional* one.
  initial_eos_count = jnp.sum(sequences0 == eos_id, axis=1)
  row_ids = jnp.arange(rows)

  init_state = SamplingLoopState(
      step=jnp.zeros((), jnp.int32),
      cur_index=index0,
      sequences=sequences0,
      cache=cache,
      cur_token=token0,
      ended=jnp.zeros((rows, 1), jnp.bool_),
      rng=rng,
      log_prob=jnp.zeros((rows,), jnp.float32),
  )

  def cond_fn(state: SamplingLoopState) -> jnp.ndarray:
    return ~jnp.all(state.ended)

  def body_fn(state: SamplingLoopState) -> SamplingLoopState:
    if state_callback_fn is not None:
      state = state_callback_fn(state)
    rng_sample, rng_next = jax.random.split(state.rng)
    decoding_state = DecodingState(
        cur_index=state.cur_index,
        sequences=state.sequences[:, :-2],
        cur_token=state.cur_token,
        cache=state.cache,
    )
    logits, new_cache = tokens_to_logits(decoding_state)
    if isinstance(state.cache, flax.core.FrozenDict) and not isinstance(
        new_cache, flax.core.FrozenDict
    ):
      new_cache = flax.core.freeze(new_cache)
    logits = logits.astype(jnp.float32)
    if logit_callback_fn is not None:
      logits = logit_callback_fn(logits, state)

    sampled, sampled_logp = _sample_next(
        logits, rng_sample, temperature, topk, topp, rescale_log_probs
    )

    # Rows at their limit write into the scratch slot (index length + 1).
    i = jnp.minimum(state.cur_index, max_len)
    forced = jnp.take_along_axis(state.sequences, (i + 1)[:, None], axis=1)[:, 0]
    out_of_prompt = forced == 0
    alive = ~state.ended[:, 0]
    token = jnp.where(out_of_prompt, sampled, forced)
    token = jnp.where(alive, token, 0)
    log_prob = state.log_prob + jnp.where(out_of_prompt & alive, sampled_logp, 0.0)
    sequences = state.sequences.at[row_ids, i + 1].set(token)
    has_new_eos = jnp.sum(sequences == eos_id, axis=1) > initial_eos_count
    ended = state.ended | (has_new_eos | (i >= max_len - 1))[:, None]
    return SamplingLoopState(
        step=state.step + 1,
        cur_index=i + 1,
        sequences=sequences,
        cache=new_cache,
        cur_token=token[:, None],
        ended=ended,
        rng=rng_next,
        log_prob=log_prob,
    )

  final_state = lax.while_loop(cond_fn, body_fn, init_state)
  if state_callback_fn is not None:
    final_state = state_callback_fn(final_state)
  # Drop BOS and the scratch slot.
  return final_state.sequences[:, 1:-1], final_state.log_prob


# ------------------------------------------------------------------------------
# Beam search.
# ------------------------------------------------------------------------------


@flax.struct.dataclass
class BeamState:
  """Loop state of `beam_search`. Beams are sorted ascending (best last).

  Attributes:
    cur_index: scalar int32 loop position.
    live_logprobs: `[batch, beams]` float32 log-probs of the live beams.
    finished_scores: `[batch, beams]` float32 length-normalized scores.
    live_seqs: `[batch, beams, length + 1]` int32 (position 0 is the first
      token fed: BOS, or the last prompt token with `initial_index`).
    finished_seqs: `[batch, beams, length + 1]` int32.
    finished_flags: `[batch, beams]` bool, which finished slots are real.
    cache: cache with `[batch, beams, ...]` leaves.
  """

  cur_index: jnp.ndarray
  live_logprobs: jnp.ndarray
  finished_scores: jnp.ndarray
  live_seqs: jnp.ndarray
  finished_seqs: jnp.ndarray
  finished_flags: jnp.ndarray
  cache: PyTree


def beam_init(
    batch_size: int,
    beam_size: int,
    max_decode_len: int,
    cache: PyTree,
    offset: int = 0,
    live_seqs: Optional[jnp.ndarray] = None,
    apply_to_index: bool = False,
) -> BeamState:
  """Initial `BeamState`: one live beam (log-prob 0), the others dead."""
  live_logprobs0 = jnp.tile(
      jnp.array([0.0] + [NEG_INF_VALUE] * (beam_size - 1), jnp.float32), (batch_size, 1)
  )
  if live_seqs is None:
    live_seqs = jnp.zeros((batch_size, beam_size, max_decode_len), jnp.int32)
  return BeamState(
      cur_index=jnp.zeros((), jnp.int32),
      live_logprobs=live_logprobs0,
      finished_scores=jnp.full((batch_size, beam_size), NEG_INF_VALUE, jnp.float32),
      live_seqs=live_seqs,
      finished_seqs=jnp.zeros((batch_size, beam_size, max_decode_len), jnp.int32),
      finished_flags=jnp.zeros((batch_size, beam_size), jnp.bool_),
      cache=_cache_map_with_offset(
          lambda x, o: add_beam_dim(x, beam_size, o), cache, offset, apply_to_index
      ),
  )


def beam_search(
    inputs: Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogitsFn,
    eos_id: int,
    num_decodes: int = 4,
    alpha: float = 0.6,
    max_decode_len: Optional[int] = None,
    max_decode_step: int = -1,
    min_log_prob: float = NEG_INF_VALUE,
    decode_rng: Optional[jnp.ndarray] = None,
    cache_offset: int = 0,
    initial_index: Optional[jnp.ndarray] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Beam search with T5X's brevity penalty and early stopping.

  Each step extends every live beam by every token, keeps the `2 * beams`
  best candidates, moves those ending in `eos_id` to the finished set (scored
  `log_prob / ((5 + length) / 6) ** alpha`, `length` counting the EOS and any
  forced prefix) and keeps the best `beams` others alive, gathering their
  caches. The loop stops at the maximum length, when no live beam can still
  beat the worst finished sequence, when every live log-prob is below
  `min_log_prob`, or after `max_decode_step` steps.

  Non-zero `inputs[:, i + 1]` positions are forced (as in
  `temperature_sample`); forced tokens are not scored and a forced EOS does
  not finish a beam. With `initial_index` the cache must already hold the
  prompt (positions `< initial_index`, `cache_index` a `[batch]` vector);
  decoding starts by feeding `inputs[:, initial_index]` and the prompt
  `inputs[:, 1:initial_index + 1]` is copied to the front of the outputs.

  Args:
    inputs: `[batch, length]` int32 shifted-right decoder inputs (all zeros
      for plain encoder-decoder decoding).
    cache: autoregressive cache for `batch` rows.
    tokens_to_logits: `DecodingState -> (logits [batch * beams, vocab],
      new_cache)`; `DecodingState.cur_index` is a scalar here.
    eos_id: end-of-sequence token id.
    num_decodes: number of beams (and of returned sequences).
    alpha: brevity penalty exponent (0 disables length normalization).
    max_decode_len: output length (defaults to `inputs.shape[1]`).
    max_decode_step: if > 0, a hard limit on the number of loop steps.
    min_log_prob: stop once no live beam has a log-prob above this.
    decode_rng: unused (T5X signature).
    cache_offset: axis of the batch in cache leaves (1 for scanned layers).
    initial_index: optional `[batch]` int32 prompt lengths for a prefilled
      cache.

  Returns:
    `(decodes [batch, beams, max_decode_len] int32, scores [batch, beams]
    float32)`, sorted by increasing score (best last). Examples for which no
    beam finished return their live beams and raw log-probs instead.
  """
  del decode_rng
  beam_size = num_decodes
  if beam_size < 1:
    raise ValueError(f'num_decodes must be >= 1, got {num_decodes}.')
  inputs = jnp.asarray(inputs).astype(jnp.int32)
  batch_size, input_len = inputs.shape
  if max_decode_len is None:
    max_decode_len = input_len
  out_len = int(max_decode_len)
  # Position 0 holds the first token fed; positions 1..out_len the outputs.
  buf_len = out_len + 1
  # forced[:, j] is the token forced at buffer position j (0: not forced).
  padded_inputs = jnp.pad(inputs, ((0, 0), (0, max(0, buf_len - input_len))))
  forced = padded_inputs[:, :buf_len]

  prefilled = initial_index is not None
  live_seqs0 = None
  if prefilled:
    initial_index = jnp.asarray(initial_index, jnp.int32).reshape((batch_size,))
    first_token = jnp.take_along_axis(padded_inputs, initial_index[:, None], axis=1)
    live_seqs0 = jnp.zeros((batch_size, beam_size, buf_len), jnp.int32)
    live_seqs0 = live_seqs0.at[:, :, 0].set(first_token)
    forced = jnp.zeros_like(forced)
    prompt_lengths = initial_index
    min_prompt = jnp.min(initial_index)
    max_prompt = jnp.max(initial_index)
  else:
    prompt_lengths = jnp.zeros((batch_size,), jnp.int32)
    min_prompt = jnp.zeros((), jnp.int32)
    max_prompt = jnp.zeros((), jnp.int32)

  init_state = beam_init(
      batch_size,
      beam_size,
      buf_len,
      cache,
      cache_offset,
      live_seqs=live_seqs0,
      apply_to_index=prefilled,
  )
  # Upper bound on the length normalizer of any sequence still to finish.
  max_brevity_penalty = brevity_penalty(alpha, buf_len + max_prompt)

  def cond_fn(state: BeamState) -> jnp.ndarray:
    not_at_end = state.cur_index + min_prompt < buf_len - 1
    best_live_scores = state.live_logprobs[:, -1:] / max_brevity_penalty
    worst_finished = jnp.min(state.finished_scores, axis=1, keepdims=True)
    worst_finished = jnp.where(state.finished_flags, worst_finished, NEG_INF_VALUE)
    search_terminated = jnp.all(worst_finished > best_live_scores)
    below_min_prob = jnp.all(state.live_logprobs[:, -1] < min_log_prob) & (state.cur_index > 0)
    too_many_steps = (max_decode_step > 0) & (state.cur_index >= max_decode_step)
    return not_at_end & ~search_terminated & ~below_min_prob & ~too_many_steps

  def body_fn(state: BeamState) -> BeamState:
    cur = state.cur_index
    flat_ids = flatten_beam_dim(
        lax.dynamic_slice(state.live_seqs, (0, 0, cur), (batch_size, beam_size, 1))
    )
    flat_cache = _cache_map_with_offset(flatten_beam_dim, state.cache, cache_offset, prefilled)
    decoding_state = DecodingState(
        cur_index=cur,
        sequences=flatten_beam_dim(state.live_seqs),
        cur_token=flat_ids,
        cache=flat_cache,
    )
    flat_logits, new_flat_cache = tokens_to_logits(decoding_state)
    if isinstance(flat_cache, flax.core.FrozenDict) and not isinstance(
        new_flat_cache, flax.core.FrozenDict
    ):
      new_flat_cache = flax.core.freeze(new_flat_cache)
    logits = unflatten_beam_dim(flat_logits.astype(jnp.float32), batch_size, beam_size)
    new_cache = _cache_map_with_offset(
        lambda x, o: unflatten_beam_dim(x, batch_size, beam_size, o),
        new_flat_cache,
        cache_offset,
        prefilled,
    )

    # Finite floor so that -inf logits never turn into NaNs.
    candidate_log_probs = jnp.maximum(jax.nn.log_softmax(logits), NEG_INF)
    log_probs = candidate_log_probs + state.live_logprobs[:, :, None]
    vocab_size = log_probs.shape[-1]
    beams_to_keep = 2 * beam_size
    flat_log_probs = log_probs.reshape((batch_size, beam_size * vocab_size))
    topk_log_probs, topk_indices = top_k_two_stage(
        flat_log_probs, k=min(beams_to_keep, beam_size * vocab_size)
    )
    if topk_log_probs.shape[1] < beams_to_keep:  # Tiny vocabularies.
      pad = beams_to_keep - topk_log_probs.shape[1]
      topk_log_probs = jnp.pad(
          topk_log_probs, ((0, 0), (0, pad)), constant_values=2 * NEG_INF_VALUE
      )
      topk_indices = jnp.pad(topk_indices, ((0, 0), (0, pad)))
    topk_ids = topk_indices % vocab_size
    topk_beam_indices = topk_indices // vocab_size

    # Teacher forcing: keep only the best beam, extended by the forced token,
    # and reset its log-prob to 0 (forced tokens are not scored).
    forced_token = lax.dynamic_index_in_dim(forced, cur + 1, axis=1, keepdims=True)  # [batch, 1]
    in_prompt = forced_token != 0
    prompt_log_probs = jnp.concatenate(
        [
            jnp.zeros((batch_size, 1), jnp.float32),
            jnp.full((batch_size, beams_to_keep - 1), NEG_INF_VALUE, jnp.float32),
        ],
        axis=1,
    )
    topk_log_probs = jnp.where(in_prompt, prompt_log_probs, topk_log_probs)
    topk_ids = jnp.where(in_prompt, forced_token, topk_ids)

    topk_seq = _gather_beam_axis(state.live_seqs, topk_beam_indices, False)
    topk_seq = lax.dynamic_update_slice(topk_seq, topk_ids[:, :, None], (0, 0, cur + 1))

    newly_finished = (topk_ids == eos_id) & ~in_prompt
    new_log_probs = topk_log_probs + newly_finished * NEG_INF

    # Live beams: the best `beam_size` unfinished candidates, best last.
    _, keep = lax.top_k(new_log_probs, k=beam_size)
    keep = jnp.flip(keep, axis=1)
    top_alive_seq = _gather_beam_axis(topk_seq, keep, False)
    top_alive_log_probs = jnp.take_along_axis(new_log_probs, keep, axis=1)
    top_alive_parents = jnp.take_along_axis(topk_beam_indices, keep, axis=1)
    top_alive_cache = cache_gather_beams(
        new_cache,
        top_alive_parents,
        batch_size,
        beam_size,
        beam_size,
        one_hot=False,
        offset=cache_offset,
        apply_to_index=prefilled,
    )

    # Finished: merge the new EOS-terminated candidates into the best set.
    lengths = prompt_lengths[:, None] + cur + 1
    new_scores = topk_log_probs / brevity_penalty(alpha, lengths)
    new_scores = jnp.where(newly_finished, new_scores, new_scores + NEG_INF_VALUE)
    finished_seqs = jnp.concatenate([state.finished_seqs, topk_seq], axis=1)
    finished_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
    finished_flags = jnp.concatenate([state.finished_flags, newly_finished], axis=1)
    top_finished_seqs, top_finished_scores, top_finished_flags = gather_topk_beams(
        [finished_seqs, finished_scores, finished_flags], finished_scores, batch_size, beam_size
    )

    return BeamState(
        cur_index=cur + 1,
        live_logprobs=top_alive_log_probs,
        finished_scores=top_finished_scores,
        live_seqs=top_alive_seq,
        finished_seqs=top_finished_seqs,
        finished_flags=top_finished_flags,
        cache=top_alive_cache,
    )

  final_state = lax.while_loop(cond_fn, body_fn, init_state)

  any_finished = jnp.any(final_state.finished_flags, axis=1)
  seqs = jnp.where(any_finished[:, None, None], final_state.finished_seqs, final_state.live_seqs)
  scores = jnp.where(any_finished[:, None], final_state.finished_scores, final_state.live_logprobs)
  # Drop the first fed token (BOS or the last prompt token).
  generated = seqs[:, :, 1:]
  if prefilled:
    # output[j] = inputs[j + 1] for j < prompt length, else generated[j - n].
    positions = jnp.arange(out_len)
    n = initial_index[:, None, None]
    gen_pos = jnp.clip(positions[None, None, :] - n, 0, out_len - 1)
    gen_part = jnp.take_along_axis(generated, jnp.broadcast_to(gen_pos, generated.shape), axis=2)
    prompt_part = jnp.broadcast_to(padded_inputs[:, None, 1 : out_len + 1], generated.shape)
    generated = jnp.where(positions[None, None, :] < n, prompt_part, gen_part)
  return generated, scores
