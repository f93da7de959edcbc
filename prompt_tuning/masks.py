"""Attention masks: the one place where the backbone's masks are built, prompt-aware.

As in T5X's `network.py`, the models build every mask in `encode` / `decode` (and the decoder-only
`__call__`) and hand them to the stacks, whose `__call__` is only the layer loop. The functions
here are what they call:

* primitives with flaxformer's semantics (`make_attention_mask`, `make_causal_mask`,
  `combine_masks`, `decoder_logit_mask`, `mask_to_bias`);
* `encoder_masks(...)` and `decoder_masks(...)`: every mask of a stack, given the tokens and,
  with a prompt, the prompt's layout (`combine_mask(tokens, mask) -> mask'`, the prompt module's
  method: prompt positions True, the rest carried over), so any combine function (prefix, suffix,
  after-BOS, user-written) gets exact masks;
* `encoder_decoder_mask(...)`: cross-attention.

By default the prompt is fully visible: prompt <-> prompt and prompt <-> real tokens attend to each
other, padding is masked (as queries and as keys). In a decoder-only prefix LM the prompt belongs
to the bidirectional prefix. A prompt module may restrict this with an *attention policy* (its
`attention_policy` attribute, see `AttentionPolicy`): the stacks hand it to `encoder_masks` /
`decoder_masks`, which apply it to the self-attention mask given the prompt positions
(`prompt_tuning/methods/prompt_masks.py` has the original code's input/prompt visibility modes).
Without a policy the masks are exactly the default ones.

The factories of the original prompt-tuning code (`create_prompt_encoder_mask(prompt_length)`,
`create_prompt_encoder_decoder_mask`, `create_prompt_decoder_only_mask`) and their functions
(`prompt_encoder_mask`, ...) are kept with their argument order and float masks; they are thin
wrappers over the functions the backbone runs, so their tests test the backbone's masks.

Packed inputs (segment ids) are not supported with prompts.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax.numpy as jnp
from jax import lax

Array = Any
DType = Any
# `combine_mask(tokens [B, L], mask [B, L] bool) -> [B, L'] bool`: where a prompt goes.
LayoutFn = Callable[[Array, Array], Array]
# `policy(attention [B, 1, Q, K] bool, prompt_mask [B, K] bool, *, causal_lm: bool, decode: bool)
#  -> [B, 1, Q, K] bool`: the self-attention mask restricted (or extended) around the prompt.
# `attention` is the default mask of the stack (its queries and keys are the same positions);
# `causal_lm` says the stack is a decoder-only causal LM (no bidirectional prefix); `decode` says
# the mask is the in-chunk mask of a decoding prefill (the layers OR it with the causal mask, so a
# policy must keep the causal pairs there).
AttentionPolicy = Callable[..., Array]

# Large negative number used to turn boolean masks into additive attention biases (flaxformer).
NEG_INF = -1e10

PACKING_ERROR = (
    'Prompt tuning does not support packed inputs (segment ids were given). '
    'Set `pack=False` in the DatasetConfig / feature converter.'
)

# ----------------------------------------------------------------------------------------------
# Primitives (flaxformer `dense_attention` semantics; boolean masks `[B, 1, Q, K]`).
# ----------------------------------------------------------------------------------------------


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable[[Array, Array], Array] = jnp.logical_and,
) -> Array:
  """Boolean mask `[batch, 1, q_len, k_len]` from per-position query and key inputs."""
  mask = pairwise_fn(jnp.expand_dims(query_input, -1), jnp.expand_dims(key_input, -2))
  return jnp.expand_dims(mask, -3).astype(bool)


def make_causal_mask(length: int) -> Array:
  """Boolean lower-triangular mask `[1, 1, length, length]`."""
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def combine_masks(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the non-None masks (broadcasting), or None."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, [m.astype(bool) for m in masks])


def decoder_logit_mask(decoder_input_tokens: Array) -> Array:
  """Boolean `[batch, length]`: positions that are not padding, with the 0-BOS kept.

  Same as flaxformer's `dense_attention.get_decoder_logit_mask` (without the trailing axis): a
  position is real if its token is non-zero, if the next token is non-zero (a BOS of a packed
  segment) or if it is the first position.
  """
  tokens = decoder_input_tokens
  shifted = jnp.pad(tokens, [(0, 0)] * (tokens.ndim - 1) + [(0, 1)])[..., 1:]
  first = lax.broadcasted_iota(jnp.int32, tokens.shape, tokens.ndim - 1) == 0
  return (tokens > 0) | (shifted > 0) | first


def mask_to_bias(mask: Optional[Array], dtype: DType) -> Optional[Array]:
  """`lax.select(mask > 0, 0, -1e10)` as in flaxformer."""
  if mask is None:
    return None
  return lax.select(
      mask > 0,
      jnp.full(mask.shape, 0.0).astype(dtype),
      jnp.full(mask.shape, NEG_INF).astype(dtype),
  )


def prompt_positions(tokens: Array, combine_mask: Optional[LayoutFn]) -> Optional[Array]:
  """`[B, L']` bool, True where the prompt sits (None without a prompt)."""
  if combine_mask is None:
    return None
  return combine_mask(tokens, jnp.zeros(tokens.shape, bool))


def _layout(combine_mask: Optional[LayoutFn], tokens: Array, mask: Array) -> Array:
  return mask if combine_mask is None else combine_mask(tokens, mask)


# ----------------------------------------------------------------------------------------------
# The backbone's masks.
# ----------------------------------------------------------------------------------------------


class EncoderMasks(NamedTuple):
  """Masks of an encoder stack (`L'` = length with the prompt)."""

  input_mask: Array  # [B, L'] bool: real positions (prompt positions included).
  attention_mask: Array  # [B, 1, L', L'] bool.
  prompt_mask: Optional[Array]  # [B, L'] bool: the prompt's positions, None without a prompt.


def encoder_masks(
    tokens: Array,
    segment_ids: Optional[Array] = None,
    *,
    combine_mask: Optional[LayoutFn] = None,
    attention_policy: Optional[AttentionPolicy] = None,
) -> EncoderMasks:
  """Self-attention masks of the encoder: non-padding (and the prompt) see each other.

  Args:
    tokens: `[B, L]` int, 0 is padding.
    segment_ids: packed segments (`[B, L]`); an error with a prompt.
    combine_mask: the prompt's layout, or None without a prompt.
    attention_policy: the prompt's attention policy (`AttentionPolicy`), applied to the
      attention mask; None keeps the default (everything real sees everything real).
  """
  if combine_mask is not None and segment_ids is not None:
    raise ValueError(PACKING_ERROR)
  input_mask = _layout(combine_mask, tokens, tokens > 0)
  attention = make_attention_mask(input_mask, input_mask)
  if segment_ids is not None:
    attention = combine_masks(attention, make_attention_mask(segment_ids, segment_ids, jnp.equal))
  prompt_mask = prompt_positions(tokens, combine_mask)
  if attention_policy is not None and prompt_mask is not None:
    attention = attention_policy(attention, prompt_mask, causal_lm=False, decode=False)
  return EncoderMasks(input_mask, attention, prompt_mask)


class DecoderMasks(NamedTuple):
  """Masks of a decoder stack (`T'` = length of the embedded chunk, prompt included)."""

  self_mask: Optional[Array]  # [B, 1, T', T'] bool; None when decoding (the cache masks).
  chunk_mask: Optional[Array]  # decode only: [B, 1, n, n] extra in-chunk pairs (prefix LM).
  logit_mask: Optional[Array]  # [B, T'] bool (None when decoding).
  query_mask: Array  # [B, T'] bool: real queries (cross-attention rows).
  prompt_mask: Optional[Array]  # [B, T'] bool: the prompt's positions (None without one).


def decoder_masks(
    tokens: Array,
    targets: Optional[Array] = None,
    *,
    causal_attention: Optional[Array] = None,
    segment_ids: Optional[Array] = None,
    decode: bool = False,
    combine_mask: Optional[LayoutFn] = None,
    prompt_in_chunk: bool = False,
    length: Optional[int] = None,
    attention_policy: Optional[AttentionPolicy] = None,
) -> DecoderMasks:
  """Masks of a decoder stack, causal or prefix LM, with an optional prompt.

  Args:
    tokens: `[B, T]` decoder input tokens (a decode chunk `[B, n]` when decoding).
    targets: `[B, T]`; padding (0) positions are masked out. If None, padding is derived from
      `tokens` (with the 0-BOS kept).
    causal_attention: `[B, T]`, 1 on the prefix of a prefix LM (bidirectional there).
    segment_ids: packed segments; an error with a prompt.
    decode: incremental decoding with a KV cache: no self-attention mask (the cache builds it);
      only the prefix LM's in-chunk mask.
    combine_mask: the prompt's layout, or None without a prompt (or when the prompt is not in
      this chunk).
    prompt_in_chunk: decoding: the chunk holds the prompt (a prefill), laid out by
      `combine_mask`.
    length: decoding: the chunk length (defaults to `T`, or the prompt layout's length).
    attention_policy: the prompt's attention policy (`AttentionPolicy`), applied to the
      self-attention mask (and, when decoding, to the in-chunk mask of a prefill that holds the
      prompt and the prefix); None keeps the default masks.

  Returns:
    `DecoderMasks`.
  """
  if combine_mask is not None and segment_ids is not None:
    raise ValueError(PACKING_ERROR)
  batch = tokens.shape[0]
  if decode:
    layout = combine_mask if prompt_in_chunk else None
    chunk_mask = None
    prompt_mask = prompt_positions(tokens, layout)
    if causal_attention is not None:
      # Bidirectional prefix inside the chunk; with a prompt, the prompt belongs to the prefix.
      prefix = _layout(layout, tokens, causal_attention > 0)
      chunk_mask = make_attention_mask(prefix, prefix)
      if attention_policy is not None and prompt_mask is not None:
        full = chunk_mask | make_causal_mask(prefix.shape[1])
        chunk_mask = attention_policy(full, prompt_mask, causal_lm=False, decode=True)
    if length is None:
      length = _layout(layout, tokens, tokens > -1).shape[1]
    return DecoderMasks(
        None,
        chunk_mask,
        None,
        jnp.ones((batch, length), bool),
        prompt_mask,
    )
  real = targets > 0 if targets is not None else decoder_logit_mask(tokens)
  real = _layout(combine_mask, tokens, real)
  logit_real = _layout(combine_mask, tokens, decoder_logit_mask(tokens))
  causal = make_causal_mask(real.shape[1])
  if causal_attention is not None:
    prefix = _layout(combine_mask, tokens, causal_attention > 0)
    causal = causal | make_attention_mask(prefix, prefix)
  self_mask = combine_masks(causal, make_attention_mask(real, real))
  if segment_ids is not None:
    self_mask = combine_masks(self_mask, make_attention_mask(segment_ids, segment_ids, jnp.equal))
  prompt_mask = prompt_positions(tokens, combine_mask)
  if attention_policy is not None and prompt_mask is not None:
    self_mask = attention_policy(
        self_mask, prompt_mask, causal_lm=causal_attention is None, decode=False
    )
  return DecoderMasks(self_mask, None, logit_real, real, prompt_mask)


def encoder_decoder_mask(
    query_mask: Array,
    encoder_input_mask: Array,
    decoder_segment_ids: Optional[Array] = None,
    encoder_segment_ids: Optional[Array] = None,
    *,
    decode: bool = False,
) -> Array:
  """Cross-attention mask `[B, 1, T, L']`: real decoder queries see real encoder positions."""
  mask = make_attention_mask(query_mask, encoder_input_mask)
  if encoder_segment_ids is not None:
    if decode:
      raise ValueError('Packed inputs (encoder_segment_ids) cannot be used when decoding.')
    mask = combine_masks(
        mask, make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal)
    )
  return mask


# ----------------------------------------------------------------------------------------------
# The original prompt-tuning code's mask API (float masks, flaxformer argument order), on top of
# the functions above.
# ----------------------------------------------------------------------------------------------


def prompt_layout(prompt_length: int, combine: Optional[Callable[..., Array]] = None) -> LayoutFn:
  """`combine_mask(tokens, mask)` of a prompt of `prompt_length` placed by `combine`.

  `combine=None` prepends (`prompts.prefix_prompt`); any combine function of
  `prompt_tuning.prompts` (or a user's) is run on the mask itself, as `prompts.combine_mask`
  does for the prompt modules.
  """

  def layout(tokens: Array, mask: Array) -> Array:
    mask = jnp.asarray(mask, bool)
    if combine is None:
      ones = jnp.ones((mask.shape[0], prompt_length), bool)
      return jnp.concatenate([ones, mask], axis=1)
    values = mask.astype(jnp.float32)[..., None]
    ones = jnp.ones((mask.shape[0], prompt_length, 1), jnp.float32)
    return combine(ones, values, tokens)[..., 0] > 0.5

  return layout


def _check_not_packed(*segment_ids: Optional[Array]) -> None:
  if any(s is not None for s in segment_ids):
    raise ValueError(PACKING_ERROR)


def add_fake_prompt(
    tokens: Array,
    prompt_length: int,
    fill_value: int = 1,
    combine: Optional[Callable[..., Array]] = None,
) -> Array:
  """`[B, P + L]` tokens: `fill_value` where the prompt goes, `tokens` elsewhere."""
  tokens = jnp.asarray(tokens)
  where = prompt_layout(prompt_length, combine)(tokens, jnp.zeros(tokens.shape, bool))
  carried = _carry(tokens, prompt_length, combine)
  return jnp.where(where, jnp.asarray(fill_value, tokens.dtype), carried).astype(tokens.dtype)


def _carry(values: Array, prompt_length: int, combine: Optional[Callable[..., Array]]) -> Array:
  """`values [B, L]` moved to their positions in the `[B, P + L]` layout (0 at the prompt)."""
  if combine is None:
    zeros = jnp.zeros((values.shape[0], prompt_length), values.dtype)
    return jnp.concatenate([zeros, values], axis=1)
  fake = jnp.zeros((values.shape[0], prompt_length, 1), jnp.int32)
  return combine(fake, values.astype(jnp.int32)[..., None], values)[..., 0].astype(values.dtype)


def prompt_input_mask(
    tokens: Array, prompt_length: int, combine: Optional[Callable[..., Array]] = None
) -> Array:
  """`[B, P + L]` bool: prompt positions and real tokens True, padding False."""
  tokens = jnp.asarray(tokens)
  return prompt_layout(prompt_length, combine)(tokens, tokens > 0)


def prompt_encoder_mask(
    encoder_input_tokens: Array,
    prompt_length: int,
    encoder_segment_ids: Optional[Array] = None,
    *,
    combine: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
) -> Array:
  """Encoder self-attention mask `[B, 1, P + L, P + L]` with a fully visible prompt."""
  _check_not_packed(encoder_segment_ids)
  tokens = jnp.asarray(encoder_input_tokens)
  masks = encoder_masks(tokens, combine_mask=prompt_layout(prompt_length, combine))
  return masks.attention_mask.astype(dtype)


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
  """Decoder -> encoder mask `[B, 1, T, P + L]`; prompt positions visible.

  With `decode=True` every query row is treated as real (the targets are not known yet), as in
  flaxformer.
  """
  _check_not_packed(encoder_segment_ids, decoder_segment_ids)
  targets = jnp.asarray(decoder_target_tokens)
  tokens = jnp.asarray(encoder_input_tokens)
  keys = encoder_masks(tokens, combine_mask=prompt_layout(prompt_length, combine)).input_mask
  queries = jnp.ones(targets.shape, bool) if decode else targets > 0
  return encoder_decoder_mask(queries, keys, decode=decode).astype(dtype)


def make_decoder_mask(
    decoder_target_tokens: Array,
    decoder_causal_attention: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
    dtype: DType = jnp.float32,
) -> Array:
  """T5X's decoder mask `[B, 1, L, L]`: causal (or prefix-LM) AND non-padding."""
  _check_not_packed(decoder_segment_ids)
  targets = jnp.asarray(decoder_target_tokens)
  causal_attention = (
      None if decoder_causal_attention is None else jnp.asarray(decoder_causal_attention)
  )
  masks = decoder_masks(targets, targets, causal_attention=causal_attention)
  return masks.self_mask.astype(dtype)


def prompt_decoder_only_mask(
    decoder_target_tokens: Array,
    prompt_length: int,
    decoder_causal_attention: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
    *,
    dtype: DType = jnp.float32,
) -> Array:
  """Decoder-only self-attention mask `[B, 1, P + L, P + L]` with the prompt prepended.

  Causal LM: plain causal mask over `P + L` positions, so every token sees the whole prompt and
  prompt position i sees prompt positions `<= i`. Prefix LM: the prompt is part of the
  bidirectional prefix, so the prompt and the inputs see each other fully.
  """
  _check_not_packed(decoder_segment_ids)
  targets = jnp.asarray(decoder_target_tokens)
  causal_attention = (
      None if decoder_causal_attention is None else jnp.asarray(decoder_causal_attention)
  )
  masks = decoder_masks(
      targets,
      targets,
      causal_attention=causal_attention,
      combine_mask=prompt_layout(prompt_length),
  )
  return masks.self_mask.astype(dtype)


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

  def encoder_decoder_mask_fn(
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

  return encoder_decoder_mask_fn


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
