"""Prefix tuning (Li & Liang 2021) and deep prompts (P-tuning v2, Liu et al. 2022).

Every selected attention gets `num_prefix` trainable key and value vectors placed before its keys
and values (the backbone's attention door: prefix key j sits at position j and token t at
`num_prefix + t` in the relative-position bias; never written into the decoding cache). By
default, as the paper does for encoder-decoder models, the prefixes go on the encoder's
self-attention and the decoder's self-attention and cross-attention (`blocks`).

Two parameterisations:

* plain (P-tuning v2, `projection=False`): `<attention>/prefix/key` and `.../value`
  `[num_prefix, heads, head_dim]`, initialized N(0, 1) as PEFT's table;
* reparameterised (Li & Liang, `projection=True`): one model-level embedding `E [n, d]` and a
  `Linear - Tanh` shared by all layers (`prefix_projection/...`, the backbone's shared-hook door)
  give a hidden state `tanh(E W1 + b1) [n, h]`; each attention's `prefix/dense` projects it to
  its keys and values. This is PEFT's / P-tuning v2's `Linear-Tanh-Linear` whose last Linear is
  split by layer. Only training uses it: the artifact (`export_prefix`) holds the projected keys
  and values, which the plain parameterisation loads for evaluation and serving (with an
  `artifact`, the projection is never built).

Hugging Face PEFT on T5 departs from the paper (methods.md §1): prefixes on the decoder's
self-attention only, taken from one table of `2 L` entries where decoder layer `l` reads entries
`(4 l mod 2 L, 4 l + 1 mod 2 L)`, so for even `L` layers `l` and `l + L/2` share theirs. With
`blocks=('self_attention',)` and `stacks=('decoder',)` our prefixes equal PEFT's (per-layer, so
PEFT's sharing is one configuration of ours); `checkpoints/peft.py` converts between the layouts.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from prompt_tuning import params as params_lib
from prompt_tuning.architectures import hooks
from prompt_tuning.methods import artifacts
from prompt_tuning.methods import p_tuning

Array = Any
Initializer = Callable[..., Array]

ALL_BLOCKS = ('attention', 'self_attention', 'encoder_decoder_attention')
PREFIX_AXES = ('prompt', 'heads', 'kv')
PROJECTION_NAME = 'prefix_projection'


def _expand(x: Array, batch_size: int) -> Array:
  return jnp.broadcast_to(x[None], (batch_size,) + x.shape)


class PrefixKeyValues(nn.Module):
  """Plain prefix keys and values `[num_prefix, heads, head_dim]` of one attention."""

  num_prefix: int
  num_heads: int
  head_dim: int
  init: Initializer = p_tuning.normal(1.0)
  artifact: Optional[artifacts.Artifact] = None

  def setup(self):
    shape = (self.num_prefix, self.num_heads, self.head_dim)
    self.key = artifacts.param(self, 'key', self.init, shape, PREFIX_AXES, self.artifact)
    self.value = artifacts.param(self, 'value', self.init, shape, PREFIX_AXES, self.artifact)

  def __call__(self, key: Array, value: Array, ctx: hooks.Context) -> Tuple[Array, Array]:
    del ctx
    return key, value

  def prefix(self, batch_size: int, ctx: hooks.Context) -> Tuple[Array, Array]:
    del ctx
    return _expand(self.key, batch_size), _expand(self.value, batch_size)


class PrefixProjection(nn.Module):
  """The shared part of the reparameterisation: `tanh(E W1 + b1)` `[num_prefix, hidden]`."""

  num_prefix: int
  embed_dim: int
  hidden: int
  init: Initializer = p_tuning.normal(1.0)

  @nn.compact
  def __call__(self, ctx: hooks.Context) -> Array:
    del ctx
    e = artifacts.param(
        self, 'embedding', self.init, (self.num_prefix, self.embed_dim), ('prompt', 'prompt_embed')
    )
    return jnp.tanh(p_tuning.Dense(self.hidden, name='dense')(e))


class ProjectedPrefix(nn.Module):
  """One attention's keys and values projected from the shared hidden state (`ctx.shared`)."""

  num_prefix: int
  num_heads: int
  head_dim: int

  def setup(self):
    self.dense = p_tuning.Dense(2 * self.num_heads * self.head_dim)

  def __call__(self, key: Array, value: Array, ctx: hooks.Context) -> Tuple[Array, Array]:
    del ctx
    return key, value

  def prefix(self, batch_size: int, ctx: hooks.Context) -> Tuple[Array, Array]:
    out = self.dense(ctx.shared[PROJECTION_NAME])
    key, value = jnp.split(out.reshape(self.num_prefix, 2, self.num_heads, self.head_dim), 2, 1)
    return _expand(key[:, 0], batch_size), _expand(value[:, 0], batch_size)


@dataclasses.dataclass(frozen=True)
class PrefixHooks(hooks.Hooks):
  """Prefix keys/values in the selected attentions (`hooks=` of a `t5.EncoderDecoder`).

  Attributes:
    num_prefix: n, prefix vectors per attention.
    num_heads: the backbone's heads (`NUM_HEADS`).
    head_dim: the backbone's head width (`HEAD_DIM`).
    blocks: attentions that get a prefix (`'attention'`: encoder self-attention;
      `'self_attention'`, `'encoder_decoder_attention'`: the decoder's).
    stacks: `'encoder'` and/or `'decoder'`.
    projection: train through the shared `Linear-Tanh` + per-layer `Linear` reparameterisation.
    projection_dim: width d of the projection's embedding (default `num_heads * head_dim`).
    projection_hidden: width h of its hidden state (default d).
    init: initializer of the plain keys/values and of the projection's embedding (N(0, 1)).
    artifact: inference parameters (plain keys/values) to load; the projection is then not built.
  """

  num_prefix: int = 10
  num_heads: int = 12
  head_dim: int = 64
  blocks: Tuple[str, ...] = ALL_BLOCKS
  stacks: Tuple[str, ...] = ('encoder', 'decoder')
  projection: bool = False
  projection_dim: Optional[int] = None
  projection_hidden: Optional[int] = None
  init: Initializer = p_tuning.normal(1.0)
  artifact: Optional[artifacts.Artifact] = None

  def __post_init__(self):
    object.__setattr__(self, 'blocks', tuple(self.blocks))
    object.__setattr__(self, 'stacks', tuple(self.stacks))
    unknown = [b for b in self.blocks if b not in ALL_BLOCKS]
    if unknown:
      raise ValueError(f'PrefixHooks.blocks must be among {ALL_BLOCKS}, got {unknown}.')
    if self.num_prefix <= 0:
      raise ValueError(f'PrefixHooks.num_prefix must be positive, got {self.num_prefix}.')
    if self.artifact is not None:

      def wanted(path):
        parts = path.split('/')
        return parts[0] in self.stacks and len(parts) >= 4 and parts[-3] in self.blocks

      self.artifact.check_covers(
          wanted, 'prefix', f'Set PREFIX_BLOCKS / PREFIX_STACKS to cover them (now {self.blocks}).'
      )

  @property
  def projected(self) -> bool:
    return self.projection and self.artifact is None

  def _active(self, site: hooks.Site) -> bool:
    return site.block in self.blocks and site.stack in self.stacks

  def attention(self, site):
    if not self._active(site):
      return None
    if self.projected:
      return ProjectedPrefix(self.num_prefix, self.num_heads, self.head_dim, name='prefix')
    return PrefixKeyValues(
        self.num_prefix, self.num_heads, self.head_dim, self.init, self.artifact, name='prefix'
    )

  def prefix_length(self, site):
    return self.num_prefix if self._active(site) else 0

  def shared(self):
    if not self.projected:
      return None
    dim = self.projection_dim or self.num_heads * self.head_dim
    return PrefixProjection(
        self.num_prefix, dim, self.projection_hidden or dim, self.init, name=PROJECTION_NAME
    )


def collapse(params: Mapping[str, Any]) -> Dict[str, Array]:
  """The plain prefix keys/values `{<attention>/prefix/{key,value}: [n, heads, dh]}` of `params`.

  Plain prefixes are returned as they are; reparameterised ones are computed from the projection
  (`tanh(E W1 + b1) W2_site + b2_site`), exactly as the modules do.
  """
  flat = params_lib.flatten_params(params)
  out = {}
  proj = PROJECTION_NAME + '/'
  hidden = None
  if proj + 'embedding' in flat:
    e = jnp.asarray(flat[proj + 'embedding'])
    hidden = jnp.tanh(e @ jnp.asarray(flat[proj + 'dense/kernel']) + flat[proj + 'dense/bias'])
  for path, value in flat.items():
    if path.endswith('/prefix/key') or path.endswith('/prefix/value'):
      out[path] = value
    elif path.endswith('/prefix/dense/kernel'):
      site = path[: -len('/dense/kernel')]
      if hidden is None:
        raise ValueError(f'{path} needs the shared projection {proj}embedding, which is missing.')
      y = hidden @ jnp.asarray(value) + jnp.asarray(flat[site + '/dense/bias'])
      n = y.shape[0]
      width = y.shape[1] // 2
      key, val = y[:, :width], y[:, width:]
      heads = _heads_of(flat, site)
      out[site + '/key'] = key.reshape(n, heads, width // heads)
      out[site + '/value'] = val.reshape(n, heads, width // heads)
  return out


def _heads_of(flat: Mapping[str, Any], site: str) -> int:
  """The number of heads: from the relative-position embedding of the site's stack."""
  stack = site.split('/')[0]
  for name in (f'{stack}/relpos_bias/rel_embedding', 'encoder/relpos_bias/rel_embedding'):
    if name in flat:
      return int(np.shape(flat[name])[0])
  raise ValueError('Cannot tell the number of heads: no relpos_bias/rel_embedding in the tree.')


def export_prefix(model: Any, params: Mapping[str, Any]) -> Dict[str, Array]:
  """`SaveCheckpointConfig.export_fn`: the plain keys/values (projected ones collapsed)."""
  del model
  return collapse(params)
