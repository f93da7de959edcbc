"""The backbone's doors: where a method plugs into the frozen T5, in the way flaxformer gives them.

The input prompt is one door (`prompt_factory`, see `prompted.py`). The others are *hooks*: small
Flax modules that the backbone builds at fixed sites of every layer and calls with the tensors
there. A method (per-layer prompts, prefix tuning, IA3, LoRA, ...) is a `Hooks` object that says,
for each site, which module goes there; the backbone never changes for a new method.

Sites (`Site`), and what a hook module built there is called with:

* `layer_input(site)`: each layer's input hidden states, `hook(x [B, L, H], ctx) -> x`. A per-layer
  prompt replaces, or adds to, the positions where `ctx.prompt_mask` is True.
* `attention(site)`: each attention (`attention` of encoder layers, `self_attention` and
  `encoder_decoder_attention` of decoder layers), `hook(key, value, ctx) -> (key, value)` on the
  projected keys and values `[B, K, heads, head_dim]` before they enter the decoding cache (e.g.
  IA3's rescaling). A hook with `num_prefix > 0` also provides `prefix(batch_size, ctx) ->
  (key [B, P, heads, head_dim], value)`: vectors placed before the keys and values (prefix
  tuning). The attention extends the mask (prefix keys are visible to every query) and the
  relative-position bias (prefix keys sit at the `P` positions before the first token, PEFT's
  convention); with the decoding cache the prefix is concatenated to the cached keys at every
  step, never written into the cache. The `Hooks` object reports the prefix length of a site
  statically (`prefix_length(site)`), so the stack can size the relative-position bias.
* `mlp_intermediate(site)`: the MLP's intermediate activations (after the activation product,
  before `wo`), `hook(h [B, L, mlp], ctx) -> h` (IA3's feed-forward rescaling).
* `dense(site)`: any dense kernel application (`site.kernel` in `query`, `key`, `value`, `out`,
  `wi`, `wi_0`, `wi_1`, `wo`, `logits_dense`), `hook(x, y, ctx) -> y` where `y = x @ kernel`
  (LoRA: `y + s * (x @ A) @ B`).
* `shared()`: model-level modules, built once in the model (not per site) with an explicit `name`
  (their parameters live at the top of the tree, e.g. `prefix_projection/embedding`), and called
  as `module(ctx) -> value` at the start of every `encode`, `decode` and decoder-only call. Every
  hook of that call reads the value as `ctx.shared[name]`: parameters shared by many sites (prefix
  tuning's reparameterisation network, whose hidden state all layers' prefixes are projected from).

Each `Hooks` method is called inside the parent module (the layer, the attention, the MLP or the
dense layer), so a module constructed there becomes the parent's child: give it a `name` and its
parameters live under the parent, for example `encoder/layers_3/attention/prefix/key` or
`decoder/layers_0/self_attention/query/lora/lora_a`. Create parameters with
`flax.linen.partitioning.param_with_axes` (logical axis names), and train them by adding a regex
for their path to the trainable regexes (`PROMPT_REGEX`), as prompts are. A method returns None, a
module, or a sequence of modules (applied in order); `Compose` combines several methods.

With no hooks (the default `hooks=None`) the parameter tree and the logits are bit-identical to
the backbone without doors.

`Context` is what a hook may read besides its tensor: the per-example integer features
(`prompt_ids`, `task_ids`, `lang_ids`, ...), the stack's prompt positions and real positions, and
whether the call is an incremental decoding step.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn

Array = Any
HookResult = Union[None, nn.Module, Sequence[nn.Module]]

# Per-example integer features (one per example) that reach the prompt module and the hooks when a
# batch has them: the models hand them over (`features=`), the feature converters keep them.
CONDITIONING_FEATURES = ('prompt_ids', 'task_ids', 'lang_ids')

# The Flax collection in which a prompt module or a hook may record per-example outputs for
# inference (`self.sow(PER_EXAMPLE_OUTPUTS, name, value)`, `value` of shape `[B, ...]`, e.g.
# ATTEMPT's mixture weights). The models' `predict_batch_with_aux` returns them in the aux dict
# under `name`, and `prompt_tuning.infer` writes them into each JSONL row's `aux`
# (`mode='predict_with_aux'`). Sowing is a no-op everywhere else (training, scoring).
PER_EXAMPLE_OUTPUTS = 'per_example_outputs'

SITE_BLOCKS = (
    'layer',
    'attention',
    'self_attention',
    'encoder_decoder_attention',
    'mlp',
    'logits',
)
DENSE_KERNELS = ('query', 'key', 'value', 'out', 'wi', 'wi_0', 'wi_1', 'wo', 'logits_dense')


@dataclasses.dataclass(frozen=True)
class Site:
  """A place in the backbone where a hook may go.

  Attributes:
    stack: `'encoder'` or `'decoder'` (the decoder-only stack is `'decoder'`).
    layer: layer index in the stack (`-1` for the stack's own `logits_dense`).
    block: one of `SITE_BLOCKS`: `'layer'` (the layer's input), an attention (`'attention'` in the
      encoder, `'self_attention'` / `'encoder_decoder_attention'` in the decoder), `'mlp'`, or
      `'logits'`.
    kernel: for dense sites, the kernel's module name (`DENSE_KERNELS`); None otherwise.
    decoder_only: the stack is a decoder-only model.
  """

  stack: str
  layer: int
  block: str
  kernel: Optional[str] = None
  decoder_only: bool = False

  def __post_init__(self):
    if self.stack not in ('encoder', 'decoder'):
      raise ValueError(f"Site.stack must be 'encoder' or 'decoder', got {self.stack!r}.")
    if self.block not in SITE_BLOCKS:
      raise ValueError(f'Site.block must be one of {SITE_BLOCKS}, got {self.block!r}.')
    if self.kernel is not None and self.kernel not in DENSE_KERNELS:
      raise ValueError(f'Site.kernel must be one of {DENSE_KERNELS}, got {self.kernel!r}.')

  def with_kernel(self, kernel: str) -> 'Site':
    """The dense site of `kernel` inside this block."""
    return dataclasses.replace(self, kernel=kernel)

  @property
  def path(self) -> str:
    """The parameter path of the site's module, e.g. `encoder/layers_3/attention/query`."""
    parts = [self.stack]
    if self.layer >= 0:
      parts.append(f'layers_{self.layer}')
    if self.block not in ('layer', 'logits'):
      parts.append(self.block)
    if self.kernel is not None:
      parts.append(self.kernel)
    return '/'.join(parts)

  @property
  def is_self_attention(self) -> bool:
    return self.block in ('attention', 'self_attention')

  @property
  def is_cross_attention(self) -> bool:
    return self.block == 'encoder_decoder_attention'


@flax.struct.dataclass
class Context:
  """Per-call inputs a hook may read (a pytree; `decode` is static).

  Attributes:
    features: per-example integer features `{name: [B] int}` (`prompt_ids`, `task_ids`,
      `lang_ids`, ...), as the model received them.
    prompt_mask: `[B, L']` bool, True at the prompt positions of this stack's sequence (None when
      the stack has no prompt, or a decoding step holds none).
    input_mask: `[B, L']` bool, the real (non-padding) positions, prompt included (None when
      decoding).
    decode: the call is an incremental decoding step over the KV cache.
    shared: `{name: value}` of the model-level `shared()` modules of the hooks (empty without).
  """

  features: Mapping[str, Array] = flax.struct.field(default_factory=dict)
  prompt_mask: Optional[Array] = None
  input_mask: Optional[Array] = None
  decode: bool = flax.struct.field(pytree_node=False, default=False)
  shared: Mapping[str, Any] = flax.struct.field(default_factory=dict)


class Hooks:
  """A method's hooks: no hook anywhere unless a method overrides a site.

  Subclass (a frozen dataclass, so it is hashable and gin-configurable) and override the sites
  the method uses. Each method runs inside the parent module; construct the hook module with an
  explicit `name` there. See the module docstring for the call contracts.
  """

  def layer_input(self, site: Site) -> HookResult:
    del site
    return None

  def attention(self, site: Site) -> HookResult:
    del site
    return None

  def prefix_length(self, site: Site) -> int:
    """Number of prefix key/value vectors the `attention(site)` hooks add (static)."""
    del site
    return 0

  def mlp_intermediate(self, site: Site) -> HookResult:
    del site
    return None

  def dense(self, site: Site) -> HookResult:
    del site
    return None

  def shared(self) -> HookResult:
    """Model-level modules (each with an explicit `name`), see the module docstring."""
    return None


@dataclasses.dataclass(frozen=True)
class Compose(Hooks):
  """Several methods at once: each site gets the hooks of every method, in order."""

  hooks: Tuple[Hooks, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'hooks', tuple(h for h in self.hooks if h is not None))

  def _all(self, name: str, site: Site) -> Tuple[nn.Module, ...]:
    out = []
    for h in self.hooks:
      out.extend(as_modules(getattr(h, name)(site)))
    return tuple(out)

  def layer_input(self, site):
    return self._all('layer_input', site)

  def attention(self, site):
    return self._all('attention', site)

  def prefix_length(self, site):
    return sum(h.prefix_length(site) for h in self.hooks)

  def mlp_intermediate(self, site):
    return self._all('mlp_intermediate', site)

  def dense(self, site):
    return self._all('dense', site)

  def shared(self):
    out = []
    for h in self.hooks:
      out.extend(as_modules(h.shared()))
    return tuple(out)


def as_modules(result: HookResult) -> Tuple[nn.Module, ...]:
  """A hook method's result as a tuple of modules."""
  if result is None:
    return ()
  if isinstance(result, nn.Module):
    return (result,)
  out = tuple(result)
  for m in out:
    if not isinstance(m, nn.Module):
      raise TypeError(f'A hook must be a flax Module (or None / a sequence of Modules), got {m!r}.')
  return out


def build(hooks: Optional[Hooks], kind: str, site: Site) -> Tuple[nn.Module, ...]:
  """Calls `hooks.<kind>(site)` (inside the parent module) and returns the modules."""
  if hooks is None or site is None:
    return ()
  return as_modules(getattr(hooks, kind)(site))


def build_shared(hooks: Optional[Hooks]) -> Tuple[nn.Module, ...]:
  """Calls `hooks.shared()` (inside the model) and returns the modules; their names must differ."""
  if hooks is None:
    return ()
  modules = as_modules(hooks.shared())
  names = [m.name for m in modules]
  if any(n is None for n in names) or len(set(names)) != len(names):
    raise ValueError(f'Shared hook modules need distinct explicit names, got {names}.')
  return modules


def with_shared(modules: Sequence[nn.Module], ctx: Context) -> Context:
  """`ctx` with `shared` holding each shared module's value `module(ctx)` (ctx unchanged without)."""
  if not modules:
    return ctx
  return ctx.replace(shared={m.name: m(ctx) for m in modules})


def prefix_length(hooks: Optional[Hooks], site: Site) -> int:
  """The number of prefix keys at an attention site (0 without hooks)."""
  if hooks is None or site is None:
    return 0
  n = int(hooks.prefix_length(site))
  if n < 0:
    raise ValueError(f'prefix_length({site.path}) must be >= 0, got {n}.')
  return n


def prefix_of(
    modules: Sequence[nn.Module], batch_size: int, ctx: Context
) -> Optional[Tuple[Array, Array]]:
  """Concatenated prefix keys and values of the attention hooks that have a prefix, or None."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  keys, values = [], []
  for m in modules:
    if getattr(m, 'num_prefix', 0):
      k, v = m.prefix(batch_size, ctx)
      keys.append(k)
      values.append(v)
  if not keys:
    return None
  return jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)
