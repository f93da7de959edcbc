"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper").

Learned rescaling vectors, initialized to ones: on the keys and values of every attention
(encoder self-attention, decoder self- and cross-attention) and on the MLP's intermediate
activations, `softmax(Q (l_k * K)^T) (l_v * V)` and `(l_ff * act(W1 x)) W2`.

Parameters as the original code's (google-research/prompt-tuning `extended/train/ia3.py`, bound as
flaxformer's `k_conv`, `v_conv` and `MlpBlock.intermediate_conv`):
`<attention>/k_conv/ia3_scaling`, `<attention>/v_conv/ia3_scaling` `[heads, head_dim]` and
`<stack>/layers_i/mlp/intermediate_conv/ia3_scaling` `[mlp]`; trained with
`TRAINABLE regex .*/ia3_scaling.*` at a constant learning rate 3e-3 (`configs/methods/ia3.gin`, the
original's `ia3_finetune.gin`).

Hugging Face PEFT (`IA3Config` for T5: target modules `k`, `v`, `wo`, feed-forward `wo`) scales
the outputs of k and v (`ia3_l [heads * head_dim, 1]`) and the input of wo (`[1, mlp]`): the same
function (the rescaling commutes with the gated product), with the vectors reshaped. The rescaling
happens before the decoding cache, so cached keys are already scaled.

`merge(params)` folds the vectors into the kernels (`key`/`value` columns, `wo` rows), for
exporting a plain checkpoint.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from prompt_tuning import params as params_lib
from prompt_tuning.architectures import hooks
from prompt_tuning.methods import artifacts

Array = Any
Initializer = Callable[..., Array]

ATTENTION_BLOCKS = ('attention', 'self_attention', 'encoder_decoder_attention')
PARAM = 'ia3_scaling'


def ones() -> Initializer:
  def init(rng, shape, dtype=jnp.float32):
    del rng
    return jnp.ones(tuple(shape), dtype)

  return init


class IA3Attention(nn.Module):
  """Rescales the keys (`which='key'`) or the values (`'value'`) by `ia3_scaling [heads, dh]`."""

  which: str
  init: Initializer = ones()
  artifact: Optional[artifacts.Artifact] = None

  @nn.compact
  def __call__(self, key: Array, value: Array, ctx: hooks.Context) -> Tuple[Array, Array]:
    del ctx
    x = key if self.which == 'key' else value
    scale = artifacts.param(self, PARAM, self.init, x.shape[-2:], ('heads', 'kv'), self.artifact)
    x = x * jnp.asarray(scale, x.dtype)
    return (x, value) if self.which == 'key' else (key, x)


class IA3(nn.Module):
  """Rescales the MLP's intermediate activations by `ia3_scaling [mlp]`."""

  init: Initializer = ones()
  artifact: Optional[artifacts.Artifact] = None

  @nn.compact
  def __call__(self, x: Array, ctx: hooks.Context) -> Array:
    del ctx
    scale = artifacts.param(self, PARAM, self.init, x.shape[-1:], ('mlp',), self.artifact)
    return x * jnp.asarray(scale, x.dtype)


@dataclasses.dataclass(frozen=True)
class IA3Hooks(hooks.Hooks):
  """IA3's rescaling vectors (`hooks=` of a `t5.EncoderDecoder` or prompted model).

  Attributes:
    attention_blocks: attentions whose keys and values are rescaled.
    mlp: rescale the MLP intermediate activations.
    stacks: `'encoder'` and/or `'decoder'`.
    init: initializer of every vector (ones: the model starts as the backbone).
    artifact: trained vectors to load.
  """

  attention_blocks: Tuple[str, ...] = ATTENTION_BLOCKS
  mlp: bool = True
  stacks: Tuple[str, ...] = ('encoder', 'decoder')
  init: Initializer = ones()
  artifact: Optional[artifacts.Artifact] = None

  def __post_init__(self):
    object.__setattr__(self, 'attention_blocks', tuple(self.attention_blocks))
    object.__setattr__(self, 'stacks', tuple(self.stacks))
    if self.artifact is not None:

      def wanted(path):
        parts = path.split('/')
        if parts[0] not in self.stacks or parts[-1] != PARAM:
          return False
        if parts[-2] == 'intermediate_conv':
          return self.mlp
        return parts[-3] in self.attention_blocks

      self.artifact.check_covers(wanted, 'IA3', 'Set IA3Hooks.attention_blocks / mlp / stacks.')

  def attention(self, site):
    if site.stack not in self.stacks or site.block not in self.attention_blocks:
      return None
    return (
        IA3Attention('key', self.init, self.artifact, name='k_conv'),
        IA3Attention('value', self.init, self.artifact, name='v_conv'),
    )

  def mlp_intermediate(self, site):
    if site.stack not in self.stacks or not self.mlp:
      return None
    return IA3(self.init, self.artifact, name='intermediate_conv')


def merge(params: Mapping[str, Any]) -> Dict[str, Any]:
  """The tree with every IA3 vector folded into its kernel and removed (a plain backbone).

  `k_conv`/`v_conv` scale the columns of `key`/`value` kernels (`[d, heads*dh]`, head-major), and
  `intermediate_conv` the rows of `wo` (`[mlp, d]`).
  """
  flat = dict(params_lib.flatten_params(params))
  out = {k: v for k, v in flat.items() if not k.endswith('/' + PARAM)}
  for path, scale in flat.items():
    if not path.endswith('/' + PARAM):
      continue
    parent, conv = path.split('/')[:-2], path.split('/')[-2]
    base = '/'.join(parent)
    scale = np.asarray(scale, np.float32)
    if conv in ('k_conv', 'v_conv'):
      kernel = f'{base}/{"key" if conv == "k_conv" else "value"}/kernel'
      out[kernel] = np.asarray(out[kernel]) * scale.reshape(1, -1)
    elif conv == 'intermediate_conv':
      kernel = f'{base}/wo/kernel'
      out[kernel] = np.asarray(out[kernel]) * scale.reshape(-1, 1)
    else:
      raise ValueError(f'Unknown IA3 parameter {path!r}.')
  return params_lib.unflatten_params(out)
