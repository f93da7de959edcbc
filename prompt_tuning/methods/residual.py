"""Residual prompt tuning (Razdaibiedina et al. 2023): the prompt through an MLP with a skip.

`P' = LN(W2 relu(W1 P + b1) + b2) + P`, row by row, one MLP shared by the prompt positions
(arazd/ResidualPrompts `prompt_tuner2.py:ResMLP`, `--separate_mlps 0`): `W1: H -> b`, `W2: b -> H`
with the bottleneck `b = 800` by default, torch's `nn.LayerNorm(H)` (affine, biased variance,
eps 1e-5) after the MLP and before the residual. The code's `MLP2` variant (the same block applied
twice with shared weights, one residual around the pair) is `num_blocks=2`.

The MLP is trained with the prompt; the saved artifact is `P'` (`export_fn =
@artifacts.export_prompt_output`), a plain prompt that evaluation and serving use without the MLP
(the paper drops it after training).

Parameters under the encoder prompt: `embedding` `[P, H]` (initialized by `prompt_init`, e.g.
sampled vocabulary as the paper), `dense_0`, `dense_1` (kernel and bias), `layer_norm/{scale,
bias}`.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from prompt_tuning import prompts
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import artifacts
from prompt_tuning.methods import p_tuning

Array = Any
Initializer = Callable[..., Array]


class TorchLayerNorm(nn.Module):
  """`(x - mean) / sqrt(var + eps) * scale + bias` (torch's `nn.LayerNorm`, biased variance)."""

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = x.shape[-1]
    scale = artifacts.param(self, 'scale', lambda r, s: jnp.ones(s), (h,), ('prompt_embed',))
    bias = artifacts.param(self, 'bias', lambda r, s: jnp.zeros(s), (h,), ('prompt_embed',))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ResidualPrompt(nn.Module):
  """A residual-reparameterised prompt generator `[P, H]` (child `prompt` of a CombinedPrompt).

  Attributes:
    length: P.
    bottleneck: b, the MLP's hidden width (800 in the paper's code).
    prompt_init: initializer of the `[P, H]` embedding.
    layer_norm: apply the LayerNorm (the code's `--mlp_layer_norm 1`).
    residual: add the skip connection (`--residual 1`).
    num_blocks: 1 (`MLP1`) or 2 (`MLP2`: the same block twice).
    embed_dim: H (inferred from the embedded inputs when None).
    dtype: the returned prompt's dtype.
    artifact: inference mode: the prompt `P'` is read from it (no MLP).
  """

  length: int
  bottleneck: int = 800
  prompt_init: Initializer = prompts.uniform(0.5)
  layer_norm: bool = True
  residual: bool = True
  num_blocks: int = 1
  embed_dim: Optional[int] = None
  dtype: Any = jnp.float32
  artifact: Optional[artifacts.Artifact] = None

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
  ) -> Array:
    del tokens, prompt_ids
    if self.artifact is not None:
      return p_tuning.saved_prompt(self, embedded)
    embed_dim = prompts.infer_embed_dim(self, self.embed_dim, embedded, 'embedding')
    p = artifacts.param(
        self, 'embedding', self.prompt_init, (self.length, embed_dim), prompts.PROMPT_AXES
    )
    down = p_tuning.Dense(self.bottleneck, name='dense_0')
    up = p_tuning.Dense(embed_dim, name='dense_1')
    norm = TorchLayerNorm(name='layer_norm') if self.layer_norm else (lambda x: x)
    x = p
    for _ in range(self.num_blocks):
      x = norm(up(nn.relu(down(x))))
    out = x + p if self.residual else x
    return out.astype(self.dtype)


def prompt_factory(
    length: int,
    bottleneck: int = 800,
    prompt_init: Initializer = prompts.uniform(0.5),
    layer_norm: bool = True,
    residual: bool = True,
    num_blocks: int = 1,
    combine: prompts.CombineFn = prompts.prefix_prompt,
    artifact: Optional[artifacts.Artifact] = None,
) -> Callable[[], prompted.CombinedPrompt]:
  """A `prompt_factory` (for `prompted.PromptEncoderDecoder`) with a residual prompt."""

  def factory() -> prompted.CombinedPrompt:
    generator = ResidualPrompt(
        length=length,
        bottleneck=bottleneck,
        prompt_init=prompt_init,
        layer_norm=layer_norm,
        residual=residual,
        num_blocks=num_blocks,
        artifact=artifact,
        parent=None,
    )
    return prompted.CombinedPrompt(prompt=generator, combine=combine)

  factory.combine = combine
  factory.length = length
  return factory
