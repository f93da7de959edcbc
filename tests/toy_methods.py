"""Tiny test-only methods, one per backbone door (`prompt_tuning/architectures/hooks.py`).

Importable as `toy_methods` from every test (tests/ is on sys.path through its conftest) and from
the subprocess runs of `tests/runtime` (runtime_testlib puts tests/ on PYTHONPATH), so gin files
can use them. They are not the library's methods; they exist to show that each door works.
"""

import dataclasses
from typing import Optional, Tuple

import flax.linen as nn
from flax.linen import partitioning as nn_partitioning
import jax
import jax.numpy as jnp

from prompt_tuning.architectures import hooks

param_with_axes = nn_partitioning.param_with_axes


def _normal(scale):
  def init(rng, shape, dtype=jnp.float32):
    return scale * jax.random.normal(rng, shape, dtype)

  return init


# ----------------------------------------------------------------------- layer-input door --


class LayerShift(nn.Module):
  """Adds a trainable vector to a layer's input (at the prompt positions when `prompt_only`)."""

  scale: float = 0.0
  prompt_only: bool = False

  @nn.compact
  def __call__(self, x, ctx):
    v = param_with_axes('vector', _normal(self.scale), (x.shape[-1],), axes=('embed',))
    shift = jnp.asarray(v, x.dtype)[None, None]
    if self.prompt_only:
      if ctx.prompt_mask is None:
        return x
      shift = shift * ctx.prompt_mask[..., None].astype(x.dtype)
    return x + shift


@dataclasses.dataclass(frozen=True)
class ShiftHooks(hooks.Hooks):
  """`LayerShift` at the input of the given layers of the given stacks."""

  stacks: Tuple[str, ...] = ('encoder',)
  layers: Optional[Tuple[int, ...]] = None
  scale: float = 0.0
  prompt_only: bool = False

  def layer_input(self, site):
    if site.stack in self.stacks and (self.layers is None or site.layer in self.layers):
      return LayerShift(self.scale, self.prompt_only, name='shift')
    return None


class SharedVector(nn.Module):
  """A model-level trainable vector (the shared-hook door): its value is `ctx.shared[name]`."""

  width: int
  scale: float = 0.5

  @nn.compact
  def __call__(self, ctx):
    del ctx
    return param_with_axes('vector', _normal(self.scale), (self.width,), axes=('embed',))


class SharedShift(nn.Module):
  """Adds the model-level vector `ctx.shared['shared_shift']` to a layer's input."""

  @nn.compact
  def __call__(self, x, ctx):
    return x + jnp.asarray(ctx.shared['shared_shift'], x.dtype)[None, None]


@dataclasses.dataclass(frozen=True)
class SharedShiftHooks(hooks.Hooks):
  """One vector, owned by the model, added to the input of every layer of `stacks`."""

  width: int = 32
  stacks: Tuple[str, ...] = ('encoder', 'decoder')
  scale: float = 0.5

  def shared(self):
    return SharedVector(self.width, self.scale, name='shared_shift')

  def layer_input(self, site):
    return SharedShift(name='shift') if site.stack in self.stacks else None


# --------------------------------------------------------------------- key/value door --


class KVPrefix(nn.Module):
  """`num_prefix` trainable key and value vectors placed before an attention's keys/values."""

  num_prefix: int
  num_heads: int
  head_dim: int
  scale: float = 1.0

  def setup(self):
    shape = (self.num_prefix, self.num_heads, self.head_dim)
    axes = ('prompt', 'heads', 'kv')
    self.key = param_with_axes('key', _normal(self.scale), shape, axes=axes)
    self.value = param_with_axes('value', _normal(self.scale), shape, axes=axes)

  def __call__(self, key, value, ctx):
    del ctx
    return key, value

  def prefix(self, batch_size, ctx):
    del ctx
    expand = lambda a: jnp.broadcast_to(a[None], (batch_size,) + a.shape)
    return expand(self.key), expand(self.value)


@dataclasses.dataclass(frozen=True)
class PrefixHooks(hooks.Hooks):
  """`KVPrefix` in the attentions whose block is in `blocks`."""

  num_prefix: int = 3
  num_heads: int = 4
  head_dim: int = 8
  blocks: Tuple[str, ...] = ('attention', 'self_attention', 'encoder_decoder_attention')
  scale: float = 1.0

  def attention(self, site):
    if site.block in self.blocks:
      return KVPrefix(self.num_prefix, self.num_heads, self.head_dim, self.scale, name='prefix')
    return None

  def prefix_length(self, site):
    return self.num_prefix if site.block in self.blocks else 0


class KVScale(nn.Module):
  """Rescales keys and values by trainable `[heads, head_dim]` vectors (IA3-like)."""

  scale: float = 0.0

  @nn.compact
  def __call__(self, key, value, ctx):
    del ctx
    shape = key.shape[-2:]
    init = lambda rng, s, dtype=jnp.float32: 1.0 + self.scale * jax.random.normal(rng, s, dtype)
    lk = param_with_axes('key_scale', init, shape, axes=('heads', 'kv'))
    lv = param_with_axes('value_scale', init, shape, axes=('heads', 'kv'))
    return key * jnp.asarray(lk, key.dtype), value * jnp.asarray(lv, value.dtype)


@dataclasses.dataclass(frozen=True)
class KVScaleHooks(hooks.Hooks):
  scale: float = 0.0

  def attention(self, site):
    return KVScale(self.scale, name='kv_scale')


# ------------------------------------------------------------------------------ MLP door --


class MlpScale(nn.Module):
  scale: float = 0.0

  @nn.compact
  def __call__(self, h, ctx):
    del ctx
    init = lambda rng, s, dtype=jnp.float32: 1.0 + self.scale * jax.random.normal(rng, s, dtype)
    l = param_with_axes('mlp_scale', init, (h.shape[-1],), axes=('mlp',))
    return h * jnp.asarray(l, h.dtype)


@dataclasses.dataclass(frozen=True)
class MlpScaleHooks(hooks.Hooks):
  scale: float = 0.0

  def mlp_intermediate(self, site):
    return MlpScale(self.scale, name='mlp_scale')


# ---------------------------------------------------------------------------- dense door --


class LowRank(nn.Module):
  """`y + (x @ a) @ b` (LoRA-like): `a` random, `b` zeros unless `b_scale`."""

  rank: int = 2
  b_scale: float = 0.0

  @nn.compact
  def __call__(self, x, y, ctx):
    del ctx
    a = param_with_axes('a', _normal(1.0), (x.shape[-1], self.rank), axes=('embed', 'rank'))
    b = param_with_axes('b', _normal(self.b_scale), (self.rank, y.shape[-1]), axes=('rank', 'mlp'))
    return y + (x @ jnp.asarray(a, x.dtype)) @ jnp.asarray(b, x.dtype)


@dataclasses.dataclass(frozen=True)
class LowRankHooks(hooks.Hooks):
  kernels: Tuple[str, ...] = ('query', 'value')
  rank: int = 2
  b_scale: float = 0.0

  def dense(self, site):
    if site.kernel in self.kernels:
      return LowRank(self.rank, self.b_scale, name='low_rank')
    return None


# ----------------------------------------------------------------- per-example features --


class TaskPrompt(nn.Module):
  """A prompt generator that picks one of `num_tasks` prompts by the `task_ids` feature."""

  num_tasks: int
  length: int
  embed_dim: Optional[int] = None

  @property
  def uses_features(self):
    return True

  @nn.compact
  def __call__(self, tokens=None, embedded=None, prompt_ids=None, features=None):
    del prompt_ids
    h = self.embed_dim or embedded.shape[-1]
    bank = param_with_axes(
        'prompt',
        _normal(0.5),
        (self.num_tasks, self.length, h),
        axes=('tasks', 'prompt', 'prompt_embed'),
    )
    if not features or 'task_ids' not in features:
      if not self.is_initializing():
        raise ValueError('TaskPrompt needs a `task_ids` feature.')
      ids = jnp.zeros((tokens.shape[0],), jnp.int32)
    else:
      ids = jnp.asarray(features['task_ids']).astype(jnp.int32).reshape(-1)
    return jnp.take(bank, ids, axis=0)


def task_prompt_factory(num_tasks: int, length: int):
  """A `prompt_factory` with a `TaskPrompt` generator, prepended."""
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top

  def factory():
    return prompted.CombinedPrompt(prompt=TaskPrompt(num_tasks, length, parent=None))

  factory.length = length
  return factory


def all_doors(scale: float = 0.5, num_prefix: int = 2) -> hooks.Compose:
  """Every door in use at once, with parameters away from their no-op values."""
  return hooks.Compose(
      (
          ShiftHooks(stacks=('encoder', 'decoder'), scale=scale),
          PrefixHooks(num_prefix=num_prefix, scale=1.0),
          KVScaleHooks(scale=scale),
          MlpScaleHooks(scale=scale),
          LowRankHooks(b_scale=scale),
      )
  )
