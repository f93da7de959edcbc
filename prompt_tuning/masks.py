"""Attention masks that know where the prompt sits.

All functions are pure. Masks follow the flaxformer/T5X convention: `[B, 1, Q,
K]` arrays of 1 (attend) / 0 (masked) in `dtype`. The prompt is always fully
visible: prompt <-> prompt and prompt <-> real tokens attend to each other,
padding is masked (as queries and as keys).

By default the prompt is assumed to be prepended (`prompts.prefix_prompt`); the
encoder functions also take a `combine` argument (any combine function of
`prompt_tuning.prompts`) to build masks for other layouts.

Packed inputs (segment ids) are not supported with prompts: every function
raises `ValueError` when segment ids are given.

Factories `create_prompt_encoder_mask(prompt_length)`,
`create_prompt_encoder_decoder_mask(prompt_length)` and
`create_prompt_decoder_only_mask(prompt_length)` bind the prompt length and
return functions with the argument order of the flaxformer mask functions they
replace.
"""

from typing import Any, Callable, Optional

import jax.numpy as jnp

Array = Any
DType = Any

PACKING_ERROR = (
    'Prompt tuning does not support packed inputs (segment ids were given). '
    'Set `pack=False` in the DatasetConfig / feature converter.'
)


def _check_not_packed(*segment_ids: Optional[Array]) -> None:
  if any(s is not None for s in segment_ids):
    raise ValueError(PACKING_ERROR)


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable[[Array, Array], Array] = (jnp.multiply),
    dtype: DType = jnp.float32,
) -> Array:
  """`[B, Lq]`, `[B, Lk]` -> `[B, 1, Lq, Lk]`: `pairwise_fn(q_i, k_j)`."""
  mask = pairwise_fn(jnp.asarray(query_input)[:, :, None], jnp.asarray(key_input)[:, None, :])
  return mask[:, None].astype(dtype)


def make_causal_mask(x: Array, dtype: DType = jnp.float32) -> Array:
  """`[B, L]` -> `[B, 1, L, L]` lower-triangular (j <= i) mask."""
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, dtype=dtype)


def add_fake_prompt(
    tokens: Array,
    prompt_length: int,
    fill_value: int = 1,
    combine: Optional[Callable[..., Array]] = None,
) -> Array:
  """Adds `prompt_length` non-padding fake tokens where the prompt goes.

  Args:
    tokens: `[B, L]` int tokens (0 is padding).
    prompt_length: P.
    fill_value: the fake (non-zero) token id.
    combine: a combine function of `prompt_tuning.prompts`; `None` prepends
      (`prefix_prompt`).

  Returns:
    `[B, P + L]` tokens: `fill_value` at prompt positions, `tokens` elsewhere.
  """
  tokens = jnp.asarray(tokens)
  if combine is None:
    fake = jnp.full((tokens.shape[0], prompt_length), fill_value, tokens.dtype)
    return jnp.concatenate([fake, tokens], axis=1)
  fake = jnp.full((tokens.shape[0], prompt_length, 1), fill_value, jnp.int32)
  out = combine(fake, tokens.astype(jnp.int32)[..., None], tokens)[..., 0]
  return out.astype(tokens.dtype)


def prompt_input_mask(
    tokens: Array, prompt_length: int, combine: Optional[Callable[..., Array]] = None
) -> Array:
  """`[B, P + L]` bool: prompt positions and real tokens True, padding False."""
  return add_fake_prompt(tokens, prompt_length, combine=combine) > 0


def prompt_encoder_mask(
    encoder_input_tokens: Array,
    prompt_length: int,
    encoder_segment_ids: Optional[Array] = None,
    *,
    combine: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
) -> Array:
  """Encoder self-attention mask with a fully visible prompt.

  Args:
    encoder_input_tokens: `[B, L]` int (0 is padding).
    prompt_length: P.
    encoder_segment_ids: must be None (no packing).
    combine: prompt layout (default prepended).
    dtype: mask dtype.

  Returns:
    `[B, 1, P + L, P + L]`: 1 where both query and key are prompt or real.
  """
  _check_not_packed(encoder_segment_ids)
  visible = prompt_input_mask(encoder_input_tokens, prompt_length, combine)
  return make_attention_mask(visible, visible, jnp.logical_and, dtype=dtype)


def prompt_encoder_decoder_mask(
    decoder_target_tokens: Array,
    encoder_input_tokens: Array,
    prompt_length: int,
    encoder_segment_ids: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
    *,
    decode: bool = False,
    combine: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
) -> Array:
  """Decoder -> encoder (cross-attention) mask; prompt positions visible.

  Args:
    decoder_target_tokens: `[B, T]` int (0 is padding).
    encoder_input_tokens: `[B, L]` int.
    prompt_length: P.
    encoder_segment_ids: must be None.
    decoder_segment_ids: must be None.
    decode: incremental decoding: every query row is treated as real (the
      targets are not known yet), as in flaxformer.
    combine: prompt layout of the encoder (default prepended).
    dtype: mask dtype.

  Returns:
    `[B, 1, T, P + L]`.
  """
  _check_not_packed(encoder_segment_ids, decoder_segment_ids)
  decoder_target_tokens = jnp.asarray(decoder_target_tokens)
  keys = prompt_input_mask(encoder_input_tokens, prompt_length, combine)
  queries = jnp.ones(decoder_target_tokens.shape, bool) if decode else decoder_target_tokens > 0
  return make_attention_mask(queries, keys, jnp.logical_and, dtype=dtype)


def make_decoder_mask(
    decoder_target_tokens: Array,
    decoder_causal_attention: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
    dtype: DType = jnp.float32,
) -> Array:
  """T5X's decoder mask: causal (or prefix-LM) AND non-padding.

  Positions `i, j` with `decoder_causal_attention[i] == decoder_causal_attention
  [j] == 1` see each other bidirectionally (the prefix of a prefix LM).

  Args:
    decoder_target_tokens: `[B, L]` int (0 is padding).
    decoder_causal_attention: optional `[B, L]` 0/1 prefix indicator.
    decoder_segment_ids: must be None.
    dtype: mask dtype.

  Returns:
    `[B, 1, L, L]`.
  """
  _check_not_packed(decoder_segment_ids)
  decoder_target_tokens = jnp.asarray(decoder_target_tokens)
  causal = make_causal_mask(decoder_target_tokens, dtype=bool)
  if decoder_causal_attention is not None:
    prefix = jnp.asarray(decoder_causal_attention) > 0
    causal = jnp.logical_or(causal, make_attention_mask(prefix, prefix, jnp.logical_and, bool))
  real = decoder_target_tokens > 0
  padding = make_attention_mask(real, real, jnp.logical_and, bool)
  return jnp.logical_and(causal, padding).astype(dtype)


def prompt_decoder_only_mask(
    decoder_target_tokens: Array,
    prompt_length: int,
    decoder_causal_attention: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
    *,
    dtype: DType = jnp.float32,
) -> Array:
  """Decoder-only self-attention mask with the prompt prepended.

  The prompt is treated as P extra leading non-padding tokens. Causal LM
  (`decoder_causal_attention is None`): plain causal mask over `P + L`
  positions, so every token sees the whole prompt and prompt position i sees
  prompt positions `<= i`. Prefix LM: the prompt is part of the bidirectional
  prefix (ones prepended to `decoder_causal_attention`), so the prompt and the
  inputs see each other fully.

  Args:
    decoder_target_tokens: `[B, L]` int (0 is padding).
    prompt_length: P.
    decoder_causal_attention: optional `[B, L]` prefix indicator.
    decoder_segment_ids: must be None.
    dtype: mask dtype.

  Returns:
    `[B, 1, P + L, P + L]`.
  """
  _check_not_packed(decoder_segment_ids)
  targets = add_fake_prompt(decoder_target_tokens, prompt_length)
  causal_attention = None
  if decoder_causal_attention is not None:
    causal_attention = add_fake_prompt(jnp.asarray(decoder_causal_attention), prompt_length)
  return make_decoder_mask(targets, causal_attention, dtype=dtype)


def create_prompt_encoder_mask(
    prompt_length: int, combine: Optional[Callable[..., Array]] = None
) -> Callable[..., Array]:
  """Binds P: `fn(encoder_input_tokens, encoder_segment_ids=None, dtype=f32)`."""

  def encoder_mask(
      encoder_input_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      dtype: DType = jnp.float32,
  ) -> Array:
    return prompt_encoder_mask(
        encoder_input_tokens, prompt_length, encoder_segment_ids, combine=combine, dtype=dtype
    )

  return encoder_mask


def create_prompt_encoder_decoder_mask(
    prompt_length: int, combine: Optional[Callable[..., Array]] = None
) -> Callable[..., Array]:
  """Binds P: `fn(decoder_target_tokens, encoder_input_tokens, ...)`."""

  def encoder_decoder_mask(
      decoder_target_tokens: Array,
      encoder_input_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      decode: bool = False,
      dtype: DType = jnp.float32,
  ) -> Array:
    return prompt_encoder_decoder_mask(
        decoder_target_tokens,
        encoder_input_tokens,
        prompt_length,
        encoder_segment_ids,
        decoder_segment_ids,
        decode=decode,
        combine=combine,
        dtype=dtype,
    )

  return encoder_decoder_mask


def create_prompt_decoder_only_mask(prompt_length: int) -> Callable[..., Array]:
  """Binds P: `fn(decoder_target_tokens, decoder_causal_attention=None, ...)`."""

  def decoder_only_mask(
      decoder_target_tokens: Array,
      decoder_causal_attention: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      dtype: DType = jnp.float32,
  ) -> Array:
    return prompt_decoder_only_mask(
        decoder_target_tokens,
        prompt_length,
        decoder_causal_attention,
        decoder_segment_ids,
        dtype=dtype,
    )

  return decoder_only_mask
