"""DePT: decomposed prompt tuning (Shi & Lipani 2024).

A shorter soft prompt plus a low-rank update of the frozen input token embeddings:
`E' = E + s A[:L] B` with `A [max_length, r]`, `B [r, H]`, `s = alpha / sqrt(r)` (the code's
`lora_alpha / math.sqrt(r)`, not `alpha / r`), added position-wise to the embedded encoder inputs
*before* the prompt is prepended (ZhengxiangShi/DePT `peft/tuners/prompt_tuning_lora.py`). `A` is
initialized U(-1/sqrt(r), 1/sqrt(r)) (`kaiming_uniform_(a=sqrt(5))` of a `[max_length, r]` tensor:
fan-in r) and `B` to zeros, so training starts from plain prompt tuning. The paper pads inputs to
`max_length`; here inputs of any length `L <= max_length` use the first L rows of `A` (the same
update at every real position; padding positions are masked anyway).

The prompt and the update have their own learning rates (the paper: prompt 0.3, `A`/`B` e.g. 1e-4
to 5e-3, same schedule): `configs/methods/dept.gin` gives them two sub-optimizers of a
`MultiOptimizer`, the second one a `LearningRateMultiplier` of the first's schedule.

Parameters (the encoder prompt module): `encoder/prompt/prompt/prompt` `[P, H]` (the short prompt,
named as plain prompt tuning's), `encoder/prompt/lora_embedding_a` `[max_length, r]`,
`encoder/prompt/lora_embedding_b` `[r, H]`.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from prompt_tuning import prompts
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import artifacts
from prompt_tuning.runtime import optimizers

Array = Any
Initializer = Callable[..., Array]


def kaiming_uniform_rank() -> Initializer:
  """U(-1/sqrt(r), 1/sqrt(r)) for `A [max_length, r]` (torch's kaiming_uniform_(a=sqrt(5)))."""

  def init(rng, shape, dtype=jnp.float32):
    bound = 1.0 / float(shape[-1]) ** 0.5
    return jax.random.uniform(rng, tuple(shape), dtype, -bound, bound)

  return init


class DecomposedPrompt(prompted.CombinedPrompt):
  """The encoder prompt module of DePT: the update `s A B` on the embedded inputs, then the prompt.

  Attributes (besides `CombinedPrompt`'s `prompt` generator and `combine`):
    max_length: rows of `A` (the longest input; DePT's `max_length`, 256 in the paper).
    rank: r.
    alpha: `s = alpha / sqrt(r)` (8 in the paper's code).
    a_init: initializer of A.
    artifact: trained `A` and `B` to load.
  """

  max_length: int = 256
  rank: int = 30
  alpha: float = 8.0
  a_init: Initializer = kaiming_uniform_rank()
  artifact: Optional[artifacts.Artifact] = None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank**0.5 if self.rank else 0.0

  def embedding_update(self, length: int, embed_dim: int) -> Array:
    """`s A[:length] B` `[length, H]`."""
    if length > self.max_length:
      raise ValueError(
          f'DePT: inputs of length {length} are longer than max_length={self.max_length} (the '
          'rows of the embedding update A); raise DEPT_MAX_LENGTH to at least the inputs length.'
      )
    a = artifacts.param(
        self,
        'lora_embedding_a',
        self.a_init,
        (self.max_length, self.rank),
        ('prompt', None),
        self.artifact,
    )
    b = artifacts.param(
        self,
        'lora_embedding_b',
        lambda r, s: jnp.zeros(s),
        (self.rank, embed_dim),
        (None, 'prompt_embed'),
        self.artifact,
    )
    return self.scale * (a[:length] @ b)

  @nn.compact
  def __call__(
      self,
      tokens: Array,
      embedded: Array,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    update = self.embedding_update(embedded.shape[1], embedded.shape[-1])
    embedded = embedded + update[None].astype(embedded.dtype)
    value = self.get_prompt(tokens.shape[0], prompt_ids, tokens, embedded, features)
    return self.combine(value.astype(embedded.dtype), embedded, tokens)


def prompt_factory(
    length: int,
    max_length: int = 256,
    rank: int = 30,
    alpha: float = 8.0,
    prompt_init: Initializer = prompts.uniform(0.5),
    combine: prompts.CombineFn = prompts.prefix_prompt,
    artifact: Optional[artifacts.Artifact] = None,
) -> Callable[[], DecomposedPrompt]:
  """A `prompt_factory` (for `prompted.PromptEncoderDecoder`) with DePT's prompt module."""

  def factory() -> DecomposedPrompt:
    generator = prompts.Prompt(length=length, prompt_init=prompt_init, parent=None)
    return DecomposedPrompt(
        prompt=generator,
        combine=combine,
        max_length=max_length,
        rank=rank,
        alpha=alpha,
        artifact=artifact,
    )

  factory.combine = combine
  factory.length = length
  return factory


class LearningRateMultiplier(optimizers.OptimizerDef):
  """A sub-optimizer whose learning rate is `multiplier` times the schedule's.

  In a `MultiOptimizer` every sub-optimizer gets the one learning rate of the schedule; wrapping
  one gives its parameters another base rate with the same schedule shape (DePT's separate
  learning rate of `A` and `B`).
  """

  def __init__(self, optimizer: optimizers.OptimizerDef, multiplier: float):
    self.optimizer = optimizer
    self.multiplier = float(multiplier)
    self.param_shaped_state = getattr(optimizer, 'param_shaped_state', True)

  @property
  def hyper_params(self):
    return self.optimizer.hyper_params

  @hyper_params.setter
  def hyper_params(self, value):
    self.optimizer.hyper_params = value

  def init_state(self, params):
    return self.optimizer.init_state(params)

  def apply_gradient(self, hyper_params, params, state, grads):
    hyper_params = hyper_params.replace(learning_rate=hyper_params.learning_rate * self.multiplier)
    return self.optimizer.apply_gradient(hyper_params, params, state, grads)

  def update_hyper_params(self, **overrides):
    return self.optimizer.update_hyper_params(**overrides)

  def set_param_axes(self, param_logical_axes):
    if hasattr(self.optimizer, 'set_param_axes'):
      self.optimizer.set_param_axes(param_logical_axes)

  def derive_logical_axes(self, state, param_logical_axes):
    return self.optimizer.derive_logical_axes(state, param_logical_axes)
