"""Per-layer prompts (google-research/prompt-tuning `extended/train/per_layer.py`).

A midpoint between prompt tuning and prefix tuning: besides the input prompt, every encoder layer
owns a prompt that, at the start of the layer (before its pre-attention layer norm, on the residual
stream), replaces (`mode='replace'`, the original's default) or is added to (`mode='add'`) the
hidden states at the prompt positions. The positions are where the input prompt sits
(`ctx.prompt_mask` of the backbone's layer-input door), so any combine function works; the
original supports only prompts at the front.

As in the original, with `replace` the layer-0 prompt overwrites the input prompt right away: the
input prompt then has no effect (and no gradient), and the L layer prompts are the effective
parameters. Only encoder layers get prompts (the original's decoder variant is unused).

Parameters: `encoder/layers_i/prompt/prompt/prompt` `[P, H]` (the original's names), or with
`num_prompts` a bank `[N, P, H]` selected per example by the `prompt_ids` feature (mixed-task
batches, like the input prompt bank).
"""

import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn

from prompt_tuning import prompts
from prompt_tuning.architectures import hooks
from prompt_tuning.methods import artifacts

Array = Any
Initializer = Callable[..., Array]

MODES = ('replace', 'add')


def scatter_prompt(prompt: Array, prompt_mask: Array) -> Array:
  """`[B, L, H]` with prompt row k at the k-th True position of each row of `prompt_mask`.

  Args:
    prompt: `[P, H]` or `[B, P, H]`.
    prompt_mask: `[B, L]` bool, P True entries per row.
  """
  index = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)  # [B, L]
  if prompt.ndim == 2:
    return prompt[index]
  return jnp.take_along_axis(prompt, index[..., None], axis=1)


class PerLayerPrompt(nn.Module):
  """One layer's prompt combined into its input at the prompt positions."""

  length: int
  mode: str = 'replace'
  prompt_init: Initializer = prompts.uniform(0.5)
  num_prompts: Optional[int] = None
  artifact: Optional[artifacts.Artifact] = None

  @nn.compact
  def __call__(self, x: Array, ctx: hooks.Context) -> Array:
    if ctx.prompt_mask is None:
      raise ValueError(
          'Per-layer prompts need prompt positions in the encoder: use a prompted model '
          '(prompted.PromptEncoderDecoder, configs/models/*_prompt.gin).'
      )
    shape = (self.length, x.shape[-1])
    axes = prompts.PROMPT_AXES
    if self.num_prompts:
      shape, axes = (self.num_prompts,) + shape, ('tasks',) + axes
    init = self.prompt_init
    if self.num_prompts and self.artifact is None:
      base = init
      init = lambda rng, s: jnp.stack([base(rng, s[1:]) for _ in range(s[0])])
    # `prompt/prompt` under the layer, as the original's `prompts.Prompt` child.
    prompt = PromptParam(shape, axes, init, self.artifact, name='prompt')()
    if self.num_prompts:
      ids = ctx.features.get('prompt_ids')
      if ids is None:
        if not self.is_initializing():
          raise ValueError('Per-layer prompt banks need the `prompt_ids` feature of each example.')
        ids = jnp.zeros((x.shape[0],), jnp.int32)
      prompt = jnp.take(prompt, jnp.asarray(ids).reshape(-1).astype(jnp.int32), axis=0)
    value = scatter_prompt(jnp.asarray(prompt, x.dtype), ctx.prompt_mask)
    mask = ctx.prompt_mask[..., None]
    if self.mode == 'replace':
      return jnp.where(mask, value, x)
    return x + jnp.where(mask, value, jnp.zeros_like(value))


class PromptParam(nn.Module):
  """A parameter named `prompt` (so the path ends in `prompt/prompt`, as the original's)."""

  shape: Tuple[int, ...]
  axes: Tuple[str, ...]
  init: Initializer
  artifact: Optional[artifacts.Artifact] = None

  @nn.compact
  def __call__(self) -> Array:
    return artifacts.param(self, 'prompt', self.init, self.shape, self.axes, self.artifact)


@dataclasses.dataclass(frozen=True)
class PerLayerPromptHooks(hooks.Hooks):
  """A prompt per encoder layer (`hooks=` of a `prompted.PromptEncoderDecoder`).

  Attributes:
    length: P (the input prompt's length).
    mode: `'replace'` (the original's default) or `'add'` (`PER_LAYER_PROMPT`).
    layers: encoder layers that get a prompt (None: all, layer 0 included, as the original).
    prompt_init: initializer of each layer's `[P, H]` prompt.
    num_prompts: a bank of that many prompts per layer, selected by `prompt_ids`.
    artifact: trained prompts to load.
  """

  length: int = 10
  mode: str = 'replace'
  layers: Optional[Tuple[int, ...]] = None
  prompt_init: Initializer = prompts.uniform(0.5)
  num_prompts: Optional[int] = None
  artifact: Optional[artifacts.Artifact] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'PER_LAYER_PROMPT mode must be one of {MODES}, got {self.mode!r}.')
    if self.layers is not None:
      object.__setattr__(self, 'layers', tuple(self.layers))

  def layer_input(self, site):
    if site.stack != 'encoder' or (self.layers is not None and site.layer not in self.layers):
      return None
    return PerLayerPrompt(
        self.length, self.mode, self.prompt_init, self.num_prompts, self.artifact, name='prompt'
    )
