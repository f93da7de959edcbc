"""LoRA (Hu et al. 2021): a low-rank update of frozen dense kernels, `y = x W + s (x A) B`.

`A [in, r]` is initialized U(-1/sqrt(in), 1/sqrt(in)) (Hugging Face PEFT's `kaiming_uniform_(a=sqrt
(5))` on its `[r, in]` weight) and `B [r, out]` to zeros, so training starts from the backbone;
`s = alpha / r` (or `alpha / sqrt(r)` with `use_rslora`, PEFT's rsLoRA). The defaults are PEFT's
for T5: rank 8, alpha 8, the `query` and `value` kernels of every attention (encoder
self-attention, decoder self- and cross-attention; the paper adapts W_q and W_v). Any dense kernel
of the backbone can be adapted (`kernels`: `query`, `key`, `value`, `out`, `wi`, `wi_0`, `wi_1`,
`wo`, `logits_dense`), through the backbone's dense door.

Parameters: `<kernel's module>/lora/lora_a` `[in, r]` and `.../lora/lora_b` `[r, out]`, e.g.
`decoder/layers_0/encoder_decoder_attention/query/lora/lora_a`. PEFT stores the transposes
(`lora_A.weight [r, in]`, `lora_B.weight [out, r]`); `checkpoints/peft.py` converts.

`merge(params, scale)` folds `s A B` into the kernels and removes the LoRA parameters, for
exporting a plain checkpoint that any T5 code loads.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from prompt_tuning import params as params_lib
from prompt_tuning.architectures import hooks
from prompt_tuning.methods import artifacts

Array = Any
Initializer = Callable[..., Array]

ATTENTION_BLOCKS = ('attention', 'self_attention', 'encoder_decoder_attention')
# Logical axes of each kernel's input and output (layers.py), for the A and B factors.
KERNEL_AXES = {
    'query': ('embed', 'joined_kv'),
    'key': ('embed', 'joined_kv'),
    'value': ('embed', 'joined_kv'),
    'out': ('joined_kv', 'embed'),
    'wi': ('embed', 'mlp'),
    'wi_0': ('embed', 'mlp'),
    'wi_1': ('embed', 'mlp'),
    'wo': ('mlp', 'embed'),
    'logits_dense': ('embed', 'vocab'),
}


def kaiming_uniform_a() -> Initializer:
  """U(-1/sqrt(in), 1/sqrt(in)) for `A [in, r]` (PEFT's init of `lora_A`)."""

  def init(rng, shape, dtype=jnp.float32):
    bound = 1.0 / float(shape[0]) ** 0.5
    return jax.random.uniform(rng, tuple(shape), dtype, -bound, bound)

  return init


def zeros() -> Initializer:
  def init(rng, shape, dtype=jnp.float32):
    del rng
    return jnp.zeros(tuple(shape), dtype)

  return init


def scaling(rank: int, alpha: Optional[float] = None, use_rslora: bool = False) -> float:
  """`alpha / r` (`alpha / sqrt(r)` with rsLoRA); `alpha` defaults to the rank (scale 1)."""
  alpha = float(rank if alpha is None else alpha)
  return alpha / (rank**0.5 if use_rslora else rank)


class LoraUpdate(nn.Module):
  """`y + s (x A) B` at one dense kernel (named `lora` under the kernel's module)."""

  kernel: str
  rank: int
  scale: float
  a_init: Initializer = kaiming_uniform_a()
  b_init: Initializer = zeros()
  artifact: Optional[artifacts.Artifact] = None

  @nn.compact
  def __call__(self, x: Array, y: Array, ctx: hooks.Context) -> Array:
    del ctx
    in_axis, out_axis = KERNEL_AXES[self.kernel]
    a = artifacts.param(
        self, 'lora_a', self.a_init, (x.shape[-1], self.rank), (in_axis, None), self.artifact
    )
    b = artifacts.param(
        self, 'lora_b', self.b_init, (self.rank, y.shape[-1]), (None, out_axis), self.artifact
    )
    update = (x @ jnp.asarray(a, x.dtype)) @ jnp.asarray(b, x.dtype)
    return y + jnp.asarray(self.scale, y.dtype) * update.astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LoraHooks(hooks.Hooks):
  """LoRA updates on the selected kernels (`hooks=` of a `t5.EncoderDecoder` or prompted model).

  Attributes:
    rank: r.
    alpha: the scale numerator (`s = alpha / r`); None means `alpha = r` (PEFT's default 8/8).
    kernels: kernels to adapt (default `('query', 'value')`).
    blocks: blocks whose kernels are adapted: attentions (`'attention'`, `'self_attention'`,
      `'encoder_decoder_attention'`), `'mlp'`, `'logits'`.
    stacks: `'encoder'` and/or `'decoder'`.
    use_rslora: `s = alpha / sqrt(r)`.
    a_init: initializer of A (PEFT's kaiming uniform).
    b_init: initializer of B (zeros).
    artifact: trained factors to load.
  """

  rank: int = 8
  alpha: Optional[float] = None
  kernels: Tuple[str, ...] = ('query', 'value')
  blocks: Tuple[str, ...] = ATTENTION_BLOCKS
  stacks: Tuple[str, ...] = ('encoder', 'decoder')
  use_rslora: bool = False
  a_init: Initializer = kaiming_uniform_a()
  b_init: Initializer = zeros()
  artifact: Optional[artifacts.Artifact] = None

  def __post_init__(self):
    for name in ('kernels', 'blocks', 'stacks'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    unknown = [k for k in self.kernels if k not in KERNEL_AXES]
    if unknown:
      raise ValueError(f'LoraHooks.kernels must be among {sorted(KERNEL_AXES)}, got {unknown}.')
    if self.rank <= 0:
      raise ValueError(f'LoraHooks.rank must be positive, got {self.rank}.')
    if self.artifact is not None:
      self._check_artifact()

  def _check_artifact(self):
    scale = self.artifact.lora_scale()
    if scale is not None and abs(scale - self.scale) > 1e-6 * max(1.0, abs(scale)):
      raise ValueError(
          f'The LoRA artifact {self.artifact.path} has scale alpha/r = {scale:g}, but LoraHooks has '
          f'rank {self.rank} and alpha {self.alpha} (scale {self.scale:g}): set LORA_ALPHA = '
          f'{scale * self.rank:g}.'
      )

    def wanted(path):
      parts = path.split('/')
      return (
          len(parts) >= 4
          and parts[-2] == 'lora'
          and parts[-3] in self.kernels
          and parts[0] in self.stacks
          and (
              parts[-4] in self.blocks or (parts[-3] == 'logits_dense' and 'logits' in self.blocks)
          )
      )

    self.artifact.check_covers(
        wanted, 'LoRA', f'Set LORA_KERNELS / LoraHooks.blocks to cover them (now {self.kernels}).'
    )

  @property
  def scale(self) -> float:
    return scaling(self.rank, self.alpha, self.use_rslora)

  def dense(self, site):
    if site.kernel not in self.kernels or site.block not in self.blocks:
      return None
    if site.stack not in self.stacks:
      return None
    return LoraUpdate(
        site.kernel, self.rank, self.scale, self.a_init, self.b_init, self.artifact, name='lora'
    )


def merge(params: Mapping[str, Any], scale: float) -> Dict[str, Any]:
  """The tree with `scale * A B` added to every adapted kernel and the LoRA factors removed."""
  flat = dict(params_lib.flatten_params(params))
  out = {k: v for k, v in flat.items() if '/lora/' not in k}
  for path, a in flat.items():
    if not path.endswith('/lora/lora_a'):
      continue
    base = path[: -len('/lora/lora_a')]
    b = np.asarray(flat[base + '/lora/lora_b'], np.float64)
    delta = scale * (np.asarray(a, np.float64) @ b)
    kernel = np.asarray(out[base + '/kernel'])
    out[base + '/kernel'] = (kernel.astype(np.float64) + delta).astype(kernel.dtype)
  return params_lib.unflatten_params(out)
