"""Prompted backbones: T5 encoder-decoder and decoder-only models with a soft prompt.

The backbone (`prompt_tuning.architectures.t5`) calls a *prompt module* through the hook described
in CONTRIBUTING.md ("Prompt modules"): `prompt_factory()` returns a module that the encoder (or
the decoder-only stack) stores as its child `prompt`. This file provides

* `CombinedPrompt`: that module. It owns a prompt generator child, also named `prompt` (a
  `prompts.Prompt`, a `PromptBank`, or any module with `length` and
  `__call__(tokens, embedded, prompt_ids=None) -> [P, H] | [B, P, H]`), and a combine function
  that places the prompt in the embedded inputs. With a `prompts.Prompt` child the parameter path
  is `encoder/prompt/prompt/prompt`, as in google-research/prompt-tuning.
* `PromptBank`: `num_prompts` prompts in one `[N, P, H]` parameter, one selected per example by
  the `prompt_ids` feature, so a batch can mix tasks.
* `make_prompt_factory(...)`: the factory the backbones take.
* `PromptEncoderDecoder`: `t5.EncoderDecoder` with an encoder prompt (same call contract; the
  decoder cross-attends to the prompt positions).
* `PromptDecoderOnly`: `t5.DecoderOnly` with the prompt before the inputs; the logits of the
  prompt positions are removed so they line up with the targets.
"""

import inspect
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
from flax.linen import partitioning
import jax
import jax.numpy as jnp

from prompt_tuning import prompts
from prompt_tuning.architectures import t5

Array = Any
DType = Any
Initializer = prompts.Initializer
CombineFn = prompts.CombineFn

BANK_AXES = ('tasks', 'prompt', 'prompt_embed')


def _accepts(module: nn.Module, name: str) -> bool:
  """Whether `module.__call__` has a parameter `name` (e.g. a generator that reads `features`)."""
  try:
    return name in inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return False


class PromptBank(nn.Module):
  """`num_prompts` prompts; example b uses prompt `prompt_ids[b]`.

  One `[num_prompts, length, embed_dim]` float32 parameter named `prompt` with logical axes
  `('tasks', 'prompt', 'prompt_embed')`.

  Attributes:
    num_prompts: N, the number of prompts (tasks).
    length: P.
    prompt_init: initializer of one `[P, H]` prompt; each prompt gets its own key.
    embed_dim: H; inferred from the embedded inputs when None.
    dtype: activation dtype of the returned prompts.
    bank_init: optional initializer of the whole `[N, P, H]` bank (overrides `prompt_init`).
  """

  num_prompts: int
  length: int
  prompt_init: Initializer = prompts.uniform(0.5)
  embed_dim: Optional[int] = None
  dtype: DType = jnp.float32
  bank_init: Optional[Initializer] = None

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
  ) -> Array:
    """Returns `[B, P, H]`: `bank[prompt_ids]`.

    Args:
      tokens: `[B, L]` inputs (only their batch size is used).
      embedded: `[B, L, H]` embedded inputs (batch size and H).
      prompt_ids: `[B]` (or `[B, 1]`) int prompt index per example. Required, except while the
        parameters are being initialized (prompt 0 is then used). Ids outside `[0, N)` give NaN.
    """
    embed_dim = prompts.infer_embed_dim(self, self.embed_dim, embedded, 'prompt')
    shape = (self.num_prompts, self.length, embed_dim)
    prompt_init = self.prompt_init
    bank_init = self.bank_init

    def init(rng, shape):
      if bank_init is not None:
        value = jnp.asarray(bank_init(rng, shape), jnp.float32)
      else:
        keys = jax.random.split(rng, shape[0])
        value = jnp.stack([jnp.asarray(prompt_init(k, shape[1:]), jnp.float32) for k in keys])
      if value.shape != tuple(shape):
        raise ValueError(f'PromptBank init returned shape {value.shape}, expected {shape}.')
      return value

    bank = partitioning.param_with_axes('prompt', init, shape, axes=BANK_AXES)
    if prompt_ids is None:
      if not self.is_initializing():
        raise ValueError(
            "A PromptBank needs a `prompt_ids` [batch] feature selecting each example's prompt "
            '(pass prompt_ids=... to apply / add the feature to the batch).'
        )
      ref = tokens if tokens is not None else embedded
      batch = 1 if ref is None else ref.shape[0]
      prompt_ids = jnp.zeros((batch,), jnp.int32)
    ids = jnp.asarray(prompt_ids).astype(jnp.int32).reshape(-1)
    out = jnp.take(bank, ids, axis=0, mode='fill', fill_value=jnp.nan)
    return out.astype(self.dtype)


class CombinedPrompt(nn.Module):
  """The backbone's prompt module: a prompt generator plus a combine function.

  Implements the CONTRIBUTING.md hook: `__call__(tokens, embedded, prompt_ids=None)`,
  `combine_mask(tokens, mask)`, `get_prompt(batch_size, prompt_ids=None)` and `length`.

  Attributes:
    prompt: the generator child (stored under the name `prompt`): returns `[P, H]` (broadcast to
      the batch) or `[B, P, H]`, and has a `length` attribute.
    combine: `combine(prompt [B, P, H], embedded [B, L, H], tokens [B, L]) -> [B, P + L, H]`.
    attention_policy: optional `masks.AttentionPolicy` restricting which of the prompt and the
      inputs attend to each other (None: the default, fully visible prompt). The backbone's masks
      apply it (`masks.encoder_masks` / `masks.decoder_masks`).
  """

  prompt: nn.Module
  combine: CombineFn = prompts.prefix_prompt
  attention_policy: Optional[Callable[..., Array]] = None

  @property
  def length(self) -> int:
    """The prompt length P."""
    return int(self.prompt.length)

  def get_prompt(
      self,
      batch_size: int,
      prompt_ids: Optional[Array] = None,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Returns the batched prompt `[batch_size, P, H]`.

    The generator gets `prompt_ids` and, when its `__call__` has a `features` parameter, every
    per-example feature of the batch (`task_ids`, `lang_ids`, ...).
    """
    kwargs = {} if prompt_ids is None else {'prompt_ids': prompt_ids}
    if features and _accepts(self.prompt, 'features'):
      kwargs['features'] = features
    if tokens is None and (prompt_ids is not None or features):
      tokens = jnp.zeros((batch_size, 1), jnp.int32)
    value = self.prompt(tokens, embedded, **kwargs)
    if value.ndim == 2:
      value = prompts.expand_to_batch(value, batch_size)
    if value.shape[0] != batch_size:
      raise ValueError(
          f'The prompt has batch size {value.shape[0]}, expected {batch_size} '
          '(prompt_ids must have one entry per example).'
      )
    return value

  def __call__(
      self,
      tokens: Array,
      embedded: Array,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Combines the prompt into `embedded [B, L, H]` -> `[B, P + L, H]`."""
    value = self.get_prompt(tokens.shape[0], prompt_ids, tokens, embedded, features)
    return self.combine(value.astype(embedded.dtype), embedded, tokens)

  def combine_mask(self, tokens: Array, mask: Array) -> Array:
    """`[B, L]` bool -> `[B, P + L]` bool, prompt positions True (no parameters used)."""
    return prompts.combine_mask(self.combine, tokens, mask, self.length)


def make_prompt_factory(
    length: int,
    prompt_init: Initializer = prompts.uniform(0.5),
    combine: CombineFn = prompts.prefix_prompt,
    embed_dim: Optional[int] = None,
    dtype: DType = jnp.float32,
    num_prompts: Optional[int] = None,
    bank_init: Optional[Initializer] = None,
    attention_policy: Optional[Callable[..., Array]] = None,
) -> Callable[[], CombinedPrompt]:
  """A `prompt_factory` for `t5.EncoderDecoder` / `t5.DecoderOnly`.

  Args:
    length: P.
    prompt_init: initializer of a `[P, H]` prompt.
    combine: where the prompt goes (`prompts.prefix_prompt`, ...).
    embed_dim: H (inferred from the embedded inputs when None).
    dtype: activation dtype of the prompt.
    num_prompts: if given, a `PromptBank` of that many prompts (selected by `prompt_ids`).
    bank_init: with `num_prompts`, an initializer of the whole `[N, P, H]` bank (e.g. a bank of
      trained prompts from `prompts.from_array`); `prompt_init` then is not used.
    attention_policy: optional `masks.AttentionPolicy` of the prompt (see `CombinedPrompt`).

  Returns:
    A zero-argument function building a `CombinedPrompt`.
  """

  def factory() -> CombinedPrompt:
    if num_prompts is None:
      generator = prompts.Prompt(
          length=length, prompt_init=prompt_init, embed_dim=embed_dim, dtype=dtype, parent=None
      )
    else:
      generator = PromptBank(
          num_prompts=num_prompts,
          length=length,
          prompt_init=prompt_init,
          embed_dim=embed_dim,
          dtype=dtype,
          bank_init=bank_init,
          parent=None,
      )
    return CombinedPrompt(prompt=generator, combine=combine, attention_policy=attention_policy)

  factory.combine = combine
  factory.length = length
  factory.attention_policy = attention_policy
  return factory


def _resolve_prompt_fields(module: nn.Module) -> None:
  """Builds `prompt_factory` from the prompt fields (called from `__post_init__`)."""
  factory = module.prompt_factory
  length = module.prompt_length
  if isinstance(factory, int) and not isinstance(factory, bool):
    # `PromptEncoderDecoder(config, 100)`: the second positional field is `prompt_factory`.
    if length is not None and length != factory:
      raise TypeError(f'prompt_length given twice ({factory} and {length}).')
    length, factory = factory, None
  if factory is not None and length is None:
    length = getattr(factory, 'length', None)
  if factory is None:
    if length is None:
      raise ValueError(f'{type(module).__name__} needs `prompt_length` (or a `prompt_factory`).')
    factory = make_prompt_factory(
        length,
        module.prompt_init,
        module.combine,
        embed_dim=module.config.emb_dim,
        dtype=module.config.activation_dtype,
        num_prompts=module.num_prompts,
        bank_init=module.bank_init,
        attention_policy=module.attention_policy,
    )
  elif module.attention_policy is not getattr(factory, 'attention_policy', None):
    raise ValueError(
        f'{type(module).__name__}: give the attention_policy to the prompt_factory (the factories '
        'of prompt_tuning.methods take `attention_policy=`), not next to a prompt_factory.'
    )
  object.__setattr__(module, 'prompt_factory', factory)
  object.__setattr__(module, 'prompt_length', length)


class PromptEncoderDecoder(t5.EncoderDecoder):
  """`t5.EncoderDecoder` with a soft prompt in the encoder (Lester et al. 2021).

  Same call contract as `t5.EncoderDecoder` (`__call__`, `encode`, `decode`, `prompt_ids=`);
  parameters are the backbone's plus `encoder/prompt/prompt/prompt` (`[P, H]`, or `[N, P, H]`
  with `num_prompts`). Encoded outputs have `P + L` positions and the decoder cross-attends to
  the prompt positions. Incremental decoding works as for the backbone (the prompt only enters
  through the encoded inputs).

  `PromptEncoderDecoder(config, prompt_length=100)`; `PromptEncoderDecoder(config, 100)` also
  works. Passing `prompt_factory` instead uses that prompt module as is.

  Attributes:
    prompt_length: P.
    prompt_init: initializer of a `[P, H]` prompt (default the paper's U[-0.5, 0.5)).
    combine: where the prompt goes in the encoder inputs.
    num_prompts: if given, a `PromptBank` of that many prompts selected by `prompt_ids`.
    bank_init: with `num_prompts`, initializer of the whole `[N, P, H]` bank (serving trained
      prompts: `configs/prompts/bank_from_file.gin`).
    attention_policy: optional `masks.AttentionPolicy` (which of the prompt and the inputs see
      each other; `configs/methods/prompt_masks.gin`).
  """

  prompt_length: Optional[int] = None
  prompt_init: Initializer = prompts.uniform(0.5)
  combine: CombineFn = prompts.prefix_prompt
  num_prompts: Optional[int] = None
  bank_init: Optional[Initializer] = None
  attention_policy: Optional[Callable[..., Array]] = None

  def __post_init__(self):
    _resolve_prompt_fields(self)
    super().__post_init__()


class PromptDecoderOnly(t5.DecoderOnly):
  """`t5.DecoderOnly` with a soft prompt before the inputs.

  Training / scoring (`decode=False`): the logits of the prompt positions are removed, so the
  output is `[B, L, V]` aligned with `decoder_target_tokens`. Decoding: call once with
  `decode=True, prefill_prompt=True` to write the prompt into the cache (cache length must be
  `P + L`), then feed tokens with `decode=True` as usual (`prefill(...)` does the first step).

  Attributes:
    prompt_length: P.
    prompt_init: initializer of a `[P, H]` prompt.
    combine: where the prompt goes (default prepended; `prompts.prefix_prompt_after_bos` keeps a
      BOS first).
    num_prompts: if given, a `PromptBank` selected by `prompt_ids`.
    bank_init: with `num_prompts`, initializer of the whole `[N, P, H]` bank.
    attention_policy: optional `masks.AttentionPolicy` of the prompt.
  """

  prompt_length: Optional[int] = None
  prompt_init: Initializer = prompts.uniform(0.5)
  combine: CombineFn = prompts.prefix_prompt
  num_prompts: Optional[int] = None
  bank_init: Optional[Initializer] = None
  attention_policy: Optional[Callable[..., Array]] = None

  def __post_init__(self):
    _resolve_prompt_fields(self)
    super().__post_init__()

  def __call__(
      self,
      decoder_input_tokens: Array,
      decoder_target_tokens: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      decoder_positions: Optional[Array] = None,
      decoder_causal_attention: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
      prompt_ids: Optional[Array] = None,
      prefill_prompt: bool = False,
  ) -> Array:
    """float32 logits: `[B, L, V]` without decoding (prompt positions removed), else the chunk's."""
    logits = super().__call__(
        decoder_input_tokens,
        decoder_target_tokens,
        decoder_segment_ids,
        decoder_positions,
        decoder_causal_attention,
        enable_dropout=enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
        prompt_ids=prompt_ids,
        prefill_prompt=prefill_prompt,
    )
    if decode:
      return logits
    return self.remove_prompt(decoder_input_tokens, logits)

  def remove_prompt(self, tokens: Array, x: Array) -> Array:
    """Drops the prompt positions of `x [B, P + L, ...]` -> `[B, L, ...]` (any combine)."""
    length = tokens.shape[1]
    if getattr(self.prompt_factory, 'combine', None) is prompts.prefix_prompt:
      return x[:, x.shape[1] - length :]
    is_prompt = self.decoder.prompt.combine_mask(tokens, jnp.zeros(tokens.shape, bool))
    # Stable sort puts the L non-prompt positions first, in order.
    index = jnp.argsort(is_prompt.astype(jnp.int32), axis=1, stable=True)[:, :length]
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)

  def prefill(
      self, batch_size: int, max_decode_length: int, prompt_ids: Optional[Array] = None
  ) -> Array:
    """Writes the prompt into the decoding cache (run with `mutable=['cache']`).

    Exact for causal LMs: feeding the tokens afterwards gives the logits of the full forward
    pass. For prefix LMs the prompt positions of the full pass also attend to the input prefix,
    which a prompt-only prefill cannot reproduce: call the module with `decode=True,
    prefill_prompt=True, decoder_causal_attention=...` and the prefix tokens instead, which writes
    the prompt and the prefix in one chunk (`models.DecoderOnlyModel` does).

    Returns the logits of the prompt positions `[B, P, V]` (usually unused).
    """
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    return super().__call__(
        tokens,
        tokens,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_decode_length,
        prompt_ids=prompt_ids,
        prefill_prompt=True,
    )
