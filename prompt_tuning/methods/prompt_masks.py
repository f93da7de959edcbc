"""Attention-mask control: which of the prompt and the inputs may attend to each other.

The original prompt-tuning code's `extended/masks.py`, as an attention policy of the backbone's
mask door (`masks.AttentionPolicy`; the prompt module's `attention_policy`, applied where every
mask is built, `masks.encoder_masks` / `masks.decoder_masks`). Attention types:

    input->input            inputs see inputs (always on)
    input->prompt           inputs see the prompt (always on)
    prompt->prompt          prompt positions see every prompt position
    prompt->prompt;causal   prompt positions see the prompt positions up to their own
    prompt->input           prompt positions see the inputs

As in the original: `allowable_attention=None` means every type; input->input and input->prompt
are added when missing (with a warning); with both prompt->prompt and prompt->prompt;causal the
causal one wins; with neither, each prompt position sees only itself. Padding stays masked.

Encoder: the prompt rows of the self-attention mask become the allowed types, the input rows keep
the default (every real position). Decoder-only prefix LM: the same for the prompt rows, where
"input" is the bidirectional prefix (never the targets); the other rows keep the default.
Decoder-only causal LM: the policy does not apply (the prompt comes first and attends causally),
as in the original. Multitask-aware: the masks are laid out by the prompt module, so a
`task_index_*` sentinel removed by the prompt's combine function (`composition.StripLeadingTokens`)
is removed from the masks too.

Incremental decoding of a decoder-only prefix LM applies the policy to the prefill chunk; the
layers OR that chunk mask with the causal mask, so the self-only mode (no prompt->prompt type),
which removes causal pairs, cannot be decoded with the KV cache and raises.

gin (`configs/methods/prompt_masks.gin`):
`prompted.PromptEncoderDecoder.attention_policy = @prompt_masks.PromptAttention()` with
`prompt_masks.PromptAttention.allowable_attention = ['prompt->input']`, or
`attention_policy=` of a composed method's prompt factory.
"""

import dataclasses
from absl import logging
from typing import Any, FrozenSet, Iterable, Optional

import jax.numpy as jnp

Array = Any

INPUT_INPUT = 'input->input'
INPUT_PROMPT = 'input->prompt'
PROMPT_PROMPT = 'prompt->prompt'
PROMPT_PROMPT_CAUSAL = 'prompt->prompt;causal'
PROMPT_INPUT = 'prompt->input'
ATTENTION_TYPES = (INPUT_INPUT, INPUT_PROMPT, PROMPT_PROMPT, PROMPT_PROMPT_CAUSAL, PROMPT_INPUT)


def normalize(allowable_attention: Optional[Iterable[str]]) -> FrozenSet[str]:
  """The effective set of attention types (the original code's rules, see module docstring)."""
  types = set(ATTENTION_TYPES if allowable_attention is None else allowable_attention)
  unknown = sorted(types - set(ATTENTION_TYPES))
  if unknown:
    raise ValueError(
        f'Unknown attention types {unknown}; allowable_attention takes types from '
        f'{list(ATTENTION_TYPES)}.'
    )
  for always in (INPUT_INPUT, INPUT_PROMPT):
    if always not in types:
      logging.warning('Attention type %s is always on; adding it.', always)
      types.add(always)
  if PROMPT_PROMPT in types and PROMPT_PROMPT_CAUSAL in types:
    types.discard(PROMPT_PROMPT)
  return frozenset(types)


def summarize(types: Iterable[str]) -> str:
  """What sees what, in words."""
  lines = []
  for attn in ATTENTION_TYPES:
    if attn in types:
      q, k = attn.split('->')
      if k.endswith(';causal'):
        lines.append(f'the {q} sees the {k[:-7]} causally (earlier positions only)')
      else:
        lines.append(f'the {q} sees the {k}')
  if not {PROMPT_PROMPT, PROMPT_PROMPT_CAUSAL} & set(types):
    lines.append('each prompt position sees only itself among the prompt positions')
  return '; '.join(lines)


@dataclasses.dataclass(frozen=True)
class PromptAttention:
  """A `masks.AttentionPolicy` with the original code's attention types (module docstring).

  Attributes:
    allowable_attention: the allowed types (any iterable of the strings above; None: all).
  """

  allowable_attention: Optional[Iterable[str]] = None

  def __post_init__(self):
    object.__setattr__(self, 'allowable_attention', normalize(self.allowable_attention))
    logging.info('Prompt attention: %s.', summarize(self.allowable_attention))

  @property
  def prompt_prompt(self) -> str:
    """'full', 'causal' or 'self'."""
    if PROMPT_PROMPT_CAUSAL in self.allowable_attention:
      return 'causal'
    if PROMPT_PROMPT in self.allowable_attention:
      return 'full'
    return 'self'

  def __call__(
      self, attention: Array, prompt_mask: Array, *, causal_lm: bool = False, decode: bool = False
  ) -> Array:
    """`attention [B, 1, Q, K]` (Q = K positions), `prompt_mask [B, K]` -> the restricted mask."""
    if causal_lm:
      return attention
    mode = self.prompt_prompt
    if decode and mode == 'self':
      raise ValueError(
          'Prompt attention without prompt->prompt (each prompt position sees only itself) '
          'cannot be decoded with the KV cache of a decoder-only model (the cache adds the causal '
          'pairs); allow prompt->prompt or prompt->prompt;causal, or score instead of decoding.'
      )
    attention = jnp.asarray(attention, bool)
    q_prompt = prompt_mask[:, None, :, None]
    k_prompt = prompt_mask[:, None, None, :]
    pos = jnp.arange(attention.shape[-1])
    if mode == 'full':
      among_prompt = jnp.ones((attention.shape[-1],) * 2, bool)
    elif mode == 'causal':
      among_prompt = pos[None, :] <= pos[:, None]
    else:
      among_prompt = pos[None, :] == pos[:, None]
    sees_prompt = k_prompt & among_prompt[None, None] & attention
    sees_input = ~k_prompt & attention & (PROMPT_INPUT in self.allowable_attention)
    return jnp.where(q_prompt, sees_prompt | sees_input, attention)
