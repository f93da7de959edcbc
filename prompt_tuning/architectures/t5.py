"""T5 1.0 / 1.1 / LM-adapted / mT5 encoder-decoder and decoder-only backbones in Flax.

The modules reproduce flaxformer's `t5_architecture` numerically and by parameter name, so that
T5X checkpoints and transformers T5 weights load as they are:

```
token_embedder/embedding                                   [vocab, d_model]
encoder/relpos_bias/rel_embedding                          [heads, 32]
encoder/layers_{i}/pre_attention_layer_norm/scale          [d_model]
encoder/layers_{i}/attention/{query,key,value}/kernel      [d_model, heads*head_dim]
encoder/layers_{i}/attention/out/kernel                    [heads*head_dim, d_model]
encoder/layers_{i}/pre_mlp_layer_norm/scale                [d_model]
encoder/layers_{i}/mlp/{wi_0,wi_1 | wi}/kernel             [d_model, mlp]
encoder/layers_{i}/mlp/wo/kernel                           [mlp, d_model]
encoder/encoder_norm/scale                                 [d_model]
decoder/relpos_bias/rel_embedding
decoder/layers_{i}/{pre_self_attention_layer_norm, self_attention, pre_cross_attention_layer_norm,
                    encoder_decoder_attention, pre_mlp_layer_norm, mlp}
decoder/decoder_norm/scale
decoder/logits_dense/kernel                                [d_model, vocab] (absent for T5 1.0)
```

`DecoderOnly` is flaxformer's `DecoderOnly`: its stack owns the embedding
(`decoder/token_embedder/embedding`) and its layers have self-attention and MLP only.

Doors for methods (see CONTRIBUTING.md, "Where things go"):

* the prompt door: with `prompt_factory`, the encoder (or the decoder-only stack) owns a child
  module named `prompt` that combines a soft prompt into the embedded inputs; the masks follow its
  `combine_mask`;
* the hook doors: `hooks` (`architectures/hooks.py`) put small modules at each layer's input, on
  each attention's keys/values (rescaling, or prefix keys/values), on the MLP's intermediate
  activations and on any dense kernel, plus model-level modules whose values every hook reads
  (`ctx.shared`);
* per-example `features` (`prompt_ids`, `task_ids`, ...) reach the prompt module and the hooks.

As in T5X's `network.py`, `EncoderDecoder.encode`/`decode` and `DecoderOnly.__call__` build every
mask (`prompt_tuning/masks.py`); the stacks' `__call__` is the layer loop.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from prompt_tuning import masks as masks_lib
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import hooks as hooks_lib
from prompt_tuning.architectures import layers

Array = Any
PromptFactory = Callable[[], nn.Module]
Hooks = hooks_lib.Hooks

PACKING_WITH_PROMPT_ERROR = (
    'Prompt tuning does not support packed inputs (segment ids were passed to a prompted model); '
    'set pack=False in the DatasetConfig (utils.DatasetConfig.pack = False).'
)


# `T5Config.remat` values -> mode (flaxformer's `layer_remat` names; booleans as before).
_REMAT_POLICIES = {
    False: 'none',
    'none': 'none',
    True: 'full',
    'full': 'full',
    'minimal': 'minimal',
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5-family backbone (hashable, usable as a static jit argument).

  Attributes:
    vocab_size: number of embeddings (`NUM_EMBEDDINGS`; 32128 for T5, 250112 for mT5).
    emb_dim: model width `d_model`.
    num_heads: attention heads.
    head_dim: width of one head (`d_kv`).
    mlp_dim: feed-forward width `d_ff`.
    num_encoder_layers: encoder layers.
    num_decoder_layers: decoder layers.
    mlp_activations: `('relu',)` (T5 1.0) or `('gelu', 'linear')` (gated GELU, T5 1.1).
    logits_via_embedding: T5 1.0 tied logits `attend(x) / sqrt(d_model)`; otherwise a separate
      `decoder/logits_dense` (T5 1.1).
    dropout_rate: dropout everywhere (`DROPOUT_RATE`).
    dtype: activation dtype (`'bfloat16'`, `'float32'` or a jnp dtype); parameters are float32.
    relative_attention_num_buckets: relative position buckets.
    relative_attention_max_distance: distance covered by the buckets.
    layer_norm_epsilon: RMSNorm epsilon.
    remat: rematerialization of each layer in the backward pass (flaxformer's `layer_remat`):
      `False`/`'none'` keeps every activation the backward pass needs; `True`/`'full'` keeps only
      the layer inputs and recomputes the layer (about one more forward pass); `'minimal'` keeps
      the outputs of the weight matmuls and recomputes attention scores and elementwise ops
      (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: little extra compute, less
      memory).
    float32_attention_logits: compute attention logits and softmax in float32.
    fuse_kernels: apply the kernels that read the same input as one matmul: query, key and value
      of a self-attention, key and value of a cross-attention, `wi_0` and `wi_1` of a gated MLP
      (`layers.fused_dense`). The parameters keep flaxformer's names and shapes (unlike
      flaxformer's own `fuse_kernels`, nothing is stored fused), dense hooks see their own slice,
      and the results equal the separate matmuls up to float rounding.
    fold_cross_attention: a cross-attention whose decoder is much shorter than the encoder (T5
      classification, short answers) folds the key and value projections of the encoder output
      into the query and the attention weights (`layers.folded_cross_attention`; only where that
      halves the FLOPs and no hook sits on those keys and values). Equal up to float rounding.
    attention_layout: the operand layout of the attention's two batched products
      (`layers.dot_product_attention`): `'bhqd'` (heads before positions; faster on XLA:CPU,
      `benchmarks/ANALYSIS.md`) or `'bqhd'` (flaxformer's einsums). Equal up to float rounding.
  """

  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  mlp_activations: Tuple[str, ...]
  logits_via_embedding: bool
  dropout_rate: float
  dtype: Any
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  remat: Union[bool, str] = False
  float32_attention_logits: bool = False
  fuse_kernels: bool = True
  fold_cross_attention: bool = True
  attention_layout: str = 'bhqd'

  def __post_init__(self):
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    for name in ('vocab_size', 'emb_dim', 'num_heads', 'head_dim', 'mlp_dim'):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f'T5Config.{name} must be positive, got {getattr(self, name)}.')
    if not self.mlp_activations:
      raise ValueError('T5Config.mlp_activations must name at least one activation.')
    for act in self.mlp_activations:
      layers.get_activation(act)
    if self.remat not in _REMAT_POLICIES:
      raise ValueError(
          f'T5Config.remat must be one of {list(_REMAT_POLICIES)}, got {self.remat!r}.'
      )
    if not 0.0 <= float(self.dropout_rate) < 1.0:
      raise ValueError(f'T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}.')
    if self.attention_layout not in layers.ATTENTION_LAYOUTS:
      raise ValueError(
          f'T5Config.attention_layout must be one of {list(layers.ATTENTION_LAYOUTS)}, got '
          f'{self.attention_layout!r}.'
      )
    layers.to_dtype(self.dtype)

  @property
  def activation_dtype(self) -> jnp.dtype:
    """The activation dtype as a `jnp.dtype`."""
    return layers.to_dtype(self.dtype)


def _t5_1_0(emb_dim, num_heads, mlp_dim, num_layers, head_dim=64, **kw) -> T5Config:
  return T5Config(
      vocab_size=32128,
      emb_dim=emb_dim,
      num_heads=num_heads,
      head_dim=head_dim,
      mlp_dim=mlp_dim,
      num_encoder_layers=num_layers,
      num_decoder_layers=num_layers,
      mlp_activations=('relu',),
      logits_via_embedding=True,
      dropout_rate=0.0,
      dtype='bfloat16',
      **kw,
  )


def _t5_1_1(emb_dim, num_heads, mlp_dim, num_layers, vocab_size=32128, **kw) -> T5Config:
  return T5Config(
      vocab_size=vocab_size,
      emb_dim=emb_dim,
      num_heads=num_heads,
      head_dim=64,
      mlp_dim=mlp_dim,
      num_encoder_layers=num_layers,
      num_decoder_layers=num_layers,
      mlp_activations=('gelu', 'linear'),
      logits_via_embedding=False,
      dropout_rate=0.0,
      dtype='bfloat16',
      **kw,
  )


PRESETS: Dict[str, T5Config] = {
    # T5 1.0 (ReLU MLP, tied and scaled logits).
    't5_1_0_small': _t5_1_0(512, 8, 2048, 6),
    't5_1_0_base': _t5_1_0(768, 12, 3072, 12),
    't5_1_0_large': _t5_1_0(1024, 16, 4096, 24),
    't5_1_0_3b': _t5_1_0(1024, 32, 16384, 24, head_dim=128),
    't5_1_0_11b': _t5_1_0(1024, 128, 65536, 24, head_dim=128),
    # T5 1.1 and the LM-adapted checkpoints (gated GELU, separate logits).
    't5_1_1_small': _t5_1_1(512, 6, 1024, 8),
    't5_1_1_base': _t5_1_1(768, 12, 2048, 12),
    't5_1_1_large': _t5_1_1(1024, 16, 2816, 24),
    't5_1_1_xl': _t5_1_1(2048, 32, 5120, 24),
    't5_1_1_xxl': _t5_1_1(4096, 64, 10240, 24),
    # mT5: T5 1.1 architecture with the 250k mC4 vocabulary.
    'mt5_small': _t5_1_1(512, 6, 1024, 8, vocab_size=250112),
    'mt5_base': _t5_1_1(768, 12, 2048, 12, vocab_size=250112),
    'mt5_large': _t5_1_1(1024, 16, 2816, 24, vocab_size=250112),
    'mt5_xl': _t5_1_1(2048, 32, 5120, 24, vocab_size=250112),
    'mt5_xxl': _t5_1_1(4096, 64, 10240, 24, vocab_size=250112),
    # Tiny T5 1.1-style model for tests and the demo.
    'tiny': T5Config(
        vocab_size=128,
        emb_dim=32,
        num_heads=4,
        head_dim=8,
        mlp_dim=64,
        num_encoder_layers=2,
        num_decoder_layers=2,
        mlp_activations=('gelu', 'linear'),
        logits_via_embedding=False,
        dropout_rate=0.0,
        dtype='float32',
    ),
}


def get_config(name: str, **overrides: Any) -> T5Config:
  """Returns the preset `name` (see `PRESETS`) with `overrides` applied.

  Raises:
    ValueError: unknown preset or unknown field in `overrides`.
  """
  if name not in PRESETS:
    raise ValueError(f'Unknown T5 config {name!r}; presets: {", ".join(sorted(PRESETS))}.')
  fields = {f.name for f in dataclasses.fields(T5Config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'Unknown T5Config field(s) {unknown}; fields: {sorted(fields)}.')
  return dataclasses.replace(PRESETS[name], **overrides)


def _maybe_remat(layer_cls, config: T5Config, static_argnums):
  mode = _REMAT_POLICIES[config.remat]
  if mode == 'none':
    return layer_cls
  policy = None if mode == 'full' else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(layer_cls, static_argnums=static_argnums, policy=policy)


def _dropout(config: T5Config, name: Optional[str] = None) -> nn.Dropout:
  return nn.Dropout(rate=config.dropout_rate, broadcast_dims=(-2,), name=name)


def _attention(
    config: T5Config, hooks: Optional[Hooks] = None, site: Optional[hooks_lib.Site] = None
) -> layers.MultiHeadDotProductAttention:
  return layers.MultiHeadDotProductAttention(
      num_heads=config.num_heads,
      head_dim=config.head_dim,
      dtype=config.activation_dtype,
      dropout_rate=config.dropout_rate,
      float32_logits=config.float32_attention_logits,
      hooks=hooks,
      site=site,
      fuse_kernels=config.fuse_kernels,
      fold_cross_attention=config.fold_cross_attention,
      attention_layout=config.attention_layout,
  )


def _layer_norm(config: T5Config) -> layers.LayerNorm:
  return layers.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.activation_dtype)


def _mlp(
    config: T5Config, hooks: Optional[Hooks] = None, site: Optional[hooks_lib.Site] = None
) -> layers.MlpBlock:
  return layers.MlpBlock(
      intermediate_dim=config.mlp_dim,
      activations=config.mlp_activations,
      dtype=config.activation_dtype,
      intermediate_dropout_rate=config.dropout_rate,
      hooks=hooks,
      site=site,
      fuse_kernels=config.fuse_kernels,
  )


def _relpos(config: T5Config) -> layers.RelativePositionBiases:
  return layers.RelativePositionBiases(
      num_buckets=config.relative_attention_num_buckets,
      max_distance=config.relative_attention_max_distance,
      num_heads=config.num_heads,
      dtype=config.activation_dtype,
  )


def _constrain(x: Array) -> Array:
  return layers.with_sharding_constraint(x, ('batch', 'length', 'embed'))


def _features(
    features: Optional[Mapping[str, Array]], prompt_ids: Optional[Array]
) -> Dict[str, Array]:
  """The per-example features of a call: `features` plus `prompt_ids` when given apart."""
  out = dict(features or {})
  if prompt_ids is not None:
    out['prompt_ids'] = prompt_ids
  return out


def _accepts_features(module: nn.Module, method: str = '__call__') -> bool:
  try:
    return 'features' in inspect.signature(getattr(type(module), method)).parameters
  except (TypeError, ValueError, AttributeError):
    return False


def _call_prompt(prompt: nn.Module, tokens: Array, embedded: Array, features) -> Array:
  """Runs a prompt module: `prompt_ids`, and all `features` if its `__call__` takes them."""
  kwargs = {'features': features} if _accepts_features(prompt) else {}
  return prompt(tokens, embedded, prompt_ids=features.get('prompt_ids'), **kwargs)


def _attention_policy(prompt: nn.Module) -> Optional[masks_lib.AttentionPolicy]:
  """A prompt module's optional `attention_policy` attribute (None: the default masks)."""
  return getattr(prompt, 'attention_policy', None)


def _get_prompt(prompt: nn.Module, batch_size: int, features) -> Array:
  kwargs = {'features': features} if _accepts_features(prompt, 'get_prompt') else {}
  return prompt.get_prompt(batch_size, features.get('prompt_ids'), **kwargs)


def _stack_prefix_length(
    hooks: Optional[Hooks], stack: str, num_layers: int, block: str, decoder_only: bool = False
) -> int:
  """The largest number of prefix keys any self-attention of the stack gets (0 without hooks)."""
  if hooks is None:
    return 0
  return max(
      [
          hooks_lib.prefix_length(hooks, hooks_lib.Site(stack, i, block, decoder_only=decoder_only))
          for i in range(num_layers)
      ]
      or [0]
  )


class EncoderLayer(nn.Module):
  """Pre-LN T5 encoder layer: self-attention and MLP, each with a residual.

  Attributes:
    config: the backbone hyper-parameters.
    layer_index: the layer's index (its hooks' `Site.layer`).
    hooks: the methods' hooks (`hooks.Hooks`), or None.
    bias_offset: prefix positions the stack's relative-position bias has room for.
  """

  config: T5Config
  layer_index: int = 0
  hooks: Optional[Hooks] = None
  bias_offset: int = 0

  def setup(self):
    cfg = self.config

    def site(block):
      return hooks_lib.Site('encoder', self.layer_index, block)

    self.input_hooks = hooks_lib.build(self.hooks, 'layer_input', site('layer'))
    self.pre_attention_layer_norm = _layer_norm(cfg)
    self.attention = _attention(cfg, self.hooks, site('attention'))
    self.post_attention_dropout = _dropout(cfg)
    self.pre_mlp_layer_norm = _layer_norm(cfg)
    self.mlp = _mlp(cfg, self.hooks, site('mlp'))
    self.post_mlp_dropout = _dropout(cfg)

  def __call__(
      self,
      inputs: Array,
      mask: Optional[Array],
      bias: Optional[Array],
      logit_mask: Optional[Array],
      ctx: hooks_lib.Context,
      enable_dropout: bool = True,
  ) -> Array:
    """Arguments are positional so the layer can be rematerialized (`enable_dropout` static)."""
    deterministic = not enable_dropout
    for hook in self.input_hooks:
      inputs = hook(inputs, ctx)
    inputs = _constrain(inputs)
    x = _constrain(self.pre_attention_layer_norm(inputs))
    if logit_mask is not None:
      x = logit_mask * x
    x = self.attention(
        x, x, mask, bias, enable_dropout=enable_dropout, ctx=ctx, bias_offset=self.bias_offset
    )
    x = _constrain(inputs + self.post_attention_dropout(x, deterministic=deterministic))
    y = _constrain(self.pre_mlp_layer_norm(x))
    if logit_mask is not None:
      y = logit_mask * y
    y = self.mlp(y, enable_dropout=enable_dropout, ctx=ctx)
    return _constrain(x + self.post_mlp_dropout(y, deterministic=deterministic))


class DecoderLayer(nn.Module):
  """Pre-LN T5 decoder layer: causal self-attention, cross-attention (unless decoder-only), MLP.

  Attributes:
    config: the backbone hyper-parameters.
    has_cross_attention: False in a decoder-only stack.
    layer_index: the layer's index (its hooks' `Site.layer`).
    hooks: the methods' hooks, or None.
    bias_offset: prefix positions the stack's relative-position bias has room for.
  """

  config: T5Config
  has_cross_attention: bool = True
  layer_index: int = 0
  hooks: Optional[Hooks] = None
  bias_offset: int = 0

  def setup(self):
    cfg = self.config
    decoder_only = not self.has_cross_attention

    def site(block):
      return hooks_lib.Site('decoder', self.layer_index, block, decoder_only=decoder_only)

    self.input_hooks = hooks_lib.build(self.hooks, 'layer_input', site('layer'))
    self.pre_self_attention_layer_norm = _layer_norm(cfg)
    self.self_attention = _attention(cfg, self.hooks, site('self_attention'))
    self.post_self_attention_dropout = _dropout(cfg)
    if self.has_cross_attention:
      self.pre_cross_attention_layer_norm = _layer_norm(cfg)
      self.encoder_decoder_attention = _attention(
          cfg, self.hooks, site('encoder_decoder_attention')
      )
      self.post_cross_attention_dropout = _dropout(cfg)
    self.pre_mlp_layer_norm = _layer_norm(cfg)
    self.mlp = _mlp(cfg, self.hooks, site('mlp'))
    self.post_mlp_dropout = _dropout(cfg)

  def __call__(
      self,
      inputs: Array,
      encoded: Optional[Array],
      self_mask: Optional[Array],
      cross_mask: Optional[Array],
      bias: Optional[Array],
      logit_mask: Optional[Array],
      ctx: hooks_lib.Context,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
      chunk_mask: Optional[Array] = None,
  ) -> Array:
    """Arguments are positional so the layer can be rematerialized (flags 8-10 static)."""
    deterministic = not enable_dropout
    for hook in self.input_hooks:
      inputs = hook(inputs, ctx)
    inputs = _constrain(inputs)
    x = _constrain(self.pre_self_attention_layer_norm(inputs))
    if logit_mask is not None:
      x = logit_mask * x
    x = self.self_attention(
        x,
        x,
        self_mask,
        bias,
        enable_dropout=enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
        chunk_mask=chunk_mask,
        ctx=ctx,
        bias_offset=self.bias_offset,
    )
    x = _constrain(inputs + self.post_self_attention_dropout(x, deterministic=deterministic))
    if encoded is not None:
      if not self.has_cross_attention:
        raise ValueError('A decoder-only layer cannot attend to encoder outputs.')
      y = _constrain(self.pre_cross_attention_layer_norm(x))
      if logit_mask is not None:
        y = logit_mask * y
      y = self.encoder_decoder_attention(
          y,
          encoded,
          cross_mask,
          None,
          enable_dropout=enable_dropout,
          ctx=ctx,
          encoded_kv_cache=decode,
      )
      x = _constrain(x + self.post_cross_attention_dropout(y, deterministic=deterministic))
    z = _constrain(self.pre_mlp_layer_norm(x))
    if logit_mask is not None:
      z = logit_mask * z
    z = self.mlp(z, enable_dropout=enable_dropout, ctx=ctx)
    return _constrain(x + self.post_mlp_dropout(z, deterministic=deterministic))


def _make_embed(config: T5Config, name: Optional[str] = None) -> layers.Embed:
  return layers.Embed(
      num_embeddings=config.vocab_size,
      features=config.emb_dim,
      dtype=config.activation_dtype,
      name=name,
  )


class Encoder(nn.Module):
  """T5 encoder stack (flaxformer `Encoder`), optionally with a prompt child named `prompt`.

  `embed` turns tokens into the stack's input (prompt combined in); `__call__` is the layer loop
  over masks built by the model (`masks.encoder_masks`).
  """

  config: T5Config
  shared_embedder: nn.Module
  prompt_factory: Optional[PromptFactory] = None
  hooks: Optional[Hooks] = None

  def setup(self):
    cfg = self.config
    if self.prompt_factory is not None:
      self.prompt = self.prompt_factory()
    self.input_dropout = _dropout(cfg)
    self.relpos_bias = _relpos(cfg)
    self.prefix_length = _stack_prefix_length(
        self.hooks, 'encoder', cfg.num_encoder_layers, 'attention'
    )
    layer_cls = _maybe_remat(EncoderLayer, cfg, static_argnums=(6,))
    self.layers = [
        layer_cls(cfg, layer_index=i, hooks=self.hooks, bias_offset=self.prefix_length)
        for i in range(cfg.num_encoder_layers)
    ]
    self.encoder_norm = _layer_norm(cfg)
    self.output_dropout = _dropout(cfg)

  def layout(self) -> Optional[masks_lib.LayoutFn]:
    """The prompt's `combine_mask` (where it sits in the inputs), None without a prompt."""
    return self.prompt.combine_mask if self.prompt_factory is not None else None

  def attention_policy(self) -> Optional[masks_lib.AttentionPolicy]:
    """The prompt module's `attention_policy` (see `masks.AttentionPolicy`), or None."""
    return _attention_policy(self.prompt) if self.prompt_factory is not None else None

  def input_mask(self, tokens: Array) -> Array:
    """Boolean `[B, L']`: real encoder positions (prompt positions included)."""
    return masks_lib.encoder_masks(tokens, combine_mask=self.layout()).input_mask

  def embed(
      self,
      tokens: Array,
      *,
      enable_dropout: bool = True,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Embeds `tokens [B, L]` and combines the prompt in -> `[B, L', d_model]`."""
    x = self.shared_embedder(tokens)
    if self.prompt_factory is not None:
      x = _call_prompt(self.prompt, tokens, x, features or {})
    x = self.input_dropout(x, deterministic=not enable_dropout)
    return _constrain(x.astype(self.config.activation_dtype))

  def __call__(
      self,
      x: Array,
      attention_mask: Array,
      input_mask: Array,
      *,
      ctx: hooks_lib.Context,
      enable_dropout: bool = True,
  ) -> Array:
    """The layer loop over embedded inputs `x [B, L', d_model]` -> encoded `[B, L', d_model]`."""
    logit_mask = input_mask[..., None].astype(self.config.activation_dtype)
    length = self.prefix_length + x.shape[1]
    bias = self.relpos_bias(length, length, True)
    for layer in self.layers:
      x = layer(x, attention_mask, bias, logit_mask, ctx, enable_dropout)
    x = self.encoder_norm(x)
    x = self.output_dropout(x, deterministic=not enable_dropout)
    return _constrain(logit_mask * x)


class Decoder(nn.Module):
  """T5 decoder stack (flaxformer `Decoder`).

  With `decoder_only=True` the stack owns its embedding (`token_embedder`), its layers have no
  cross-attention, and an optional prompt child named `prompt` is combined into the inputs.
  `embed` turns tokens (or the prompt, when prefilling a decoding cache) into the stack's input;
  `__call__` is the layer loop over masks built by the model (`masks.decoder_masks`).
  """

  config: T5Config
  shared_embedder: Optional[nn.Module] = None
  prompt_factory: Optional[PromptFactory] = None
  decoder_only: bool = False
  hooks: Optional[Hooks] = None

  def setup(self):
    cfg = self.config
    if self.shared_embedder is None:
      self.token_embedder = _make_embed(cfg)
    if self.prompt_factory is not None:
      if not self.decoder_only:
        raise ValueError('Decoder prompts are only supported for decoder-only models.')
      self.prompt = self.prompt_factory()
    self.input_dropout = _dropout(cfg)
    self.relpos_bias = _relpos(cfg)
    self.prefix_length = _stack_prefix_length(
        self.hooks, 'decoder', cfg.num_decoder_layers, 'self_attention', self.decoder_only
    )
    layer_cls = _maybe_remat(DecoderLayer, cfg, static_argnums=(8, 9, 10))
    self.layers = [
        layer_cls(
            cfg,
            has_cross_attention=not self.decoder_only,
            layer_index=i,
            hooks=self.hooks,
            bias_offset=self.prefix_length,
        )
        for i in range(cfg.num_decoder_layers)
    ]
    self.decoder_norm = _layer_norm(cfg)
    self.output_dropout = _dropout(cfg)
    if not cfg.logits_via_embedding:
      self.logits_dense = layers.DenseGeneral(
          cfg.vocab_size,
          ('embed', 'vocab'),
          dtype=jnp.float32,
          hooks=self.hooks,
          site=hooks_lib.Site(
              'decoder', -1, 'logits', 'logits_dense', decoder_only=self.decoder_only
          ),
      )

  def _embedder(self) -> nn.Module:
    return self.shared_embedder if self.shared_embedder is not None else self.token_embedder

  def layout(self) -> Optional[masks_lib.LayoutFn]:
    """The prompt's `combine_mask`, None without a prompt."""
    return self.prompt.combine_mask if self.prompt_factory is not None else None

  def attention_policy(self) -> Optional[masks_lib.AttentionPolicy]:
    """The prompt module's `attention_policy` (see `masks.AttentionPolicy`), or None."""
    return _attention_policy(self.prompt) if self.prompt_factory is not None else None

  def embed(
      self,
      tokens: Array,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      prefill_prompt: bool = False,
      prefill_prefix: bool = False,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """The stack's input `[B, T', d_model]`.

    Without a prompt, or when decoding tokens after the prompt was prefilled, the embedded
    tokens. Training/scoring with a prompt: the prompt combined into the embedded tokens.
    `prefill_prompt`: the prompt alone `[B, P, d]`; with `prefill_prefix` (prefix LM) the prompt
    and the prefix tokens combined as in training.
    """
    features = features or {}
    if prefill_prompt and not prefill_prefix:
      x = _get_prompt(self.prompt, tokens.shape[0], features)
    elif prefill_prefix:
      x = _call_prompt(self.prompt, tokens, self._embedder()(tokens), features)
    else:
      x = self._embedder()(tokens)
      if self.prompt_factory is not None and not decode:
        x = _call_prompt(self.prompt, tokens, x, features)
    x = self.input_dropout(x, deterministic=not enable_dropout)
    return _constrain(x.astype(self.config.activation_dtype))

  def __call__(
      self,
      x: Array,
      encoded: Optional[Array],
      *,
      self_mask: Optional[Array],
      cross_mask: Optional[Array],
      logit_mask: Optional[Array],
      chunk_mask: Optional[Array] = None,
      ctx: hooks_lib.Context,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
  ) -> Array:
    """The layer loop over the stack's input `x [B, T', d_model]` -> float32 logits.

    Args:
      x: from `embed`.
      encoded: encoder outputs `[B, L', d_model]`, or None for a decoder-only stack.
      self_mask: `[B, 1, T', T']` bool (None when decoding: the cache masks).
      cross_mask: `[B, 1, T', L']` bool cross-attention mask.
      logit_mask: `[B, T']` bool real positions (None when decoding).
      chunk_mask: decoding: extra in-chunk pairs (prefix LM).
      ctx: what hooks may read.
      enable_dropout: enables dropout.
      decode: autoregressive decoding with the KV cache.
      max_decode_length: cache length when the cache is created.
    """
    cfg = self.config
    length = x.shape[1]
    offset = self.prefix_length
    # Relative position bias, shared by all layers (with room for prefix keys).
    if decode:
      relpos_length = offset + (max_decode_length or length)
      bias = self.relpos_bias(relpos_length, relpos_length, False, decode=True)
    else:
      bias = self.relpos_bias(offset + length, offset + length, False)
    mask = None if logit_mask is None else logit_mask[..., None].astype(cfg.activation_dtype)
    for layer in self.layers:
      x = layer(
          x,
          encoded,
          self_mask,
          cross_mask,
          bias,
          mask,
          ctx,
          enable_dropout,
          decode,
          max_decode_length,
          chunk_mask,
      )

    x = self.decoder_norm(x)
    x = self.output_dropout(x, deterministic=not enable_dropout)
    x = _constrain(x)
    if cfg.logits_via_embedding:
      logits = self._embedder().attend(x) / jnp.sqrt(jnp.float32(x.shape[-1]))
    else:
      logits = self.logits_dense(x, ctx)
    logits = logits.astype(jnp.float32)
    return layers.with_sharding_constraint(logits, ('batch', 'length', 'vocab'))


class EncoderDecoder(nn.Module):
  """T5 encoder-decoder (flaxformer `EncoderDecoder`) with an optional encoder prompt.

  As in T5X's `network.py`, `encode` and `decode` build the masks (`prompt_tuning.masks`) and
  hand them to the stacks.

  Attributes:
    config: the backbone hyper-parameters.
    prompt_factory: returns the prompt module stored as `encoder/prompt`.
    hooks: the methods' hooks (`hooks.Hooks`: per-layer inputs, attention keys/values, MLP
      activations, dense kernels), or None.
  """

  config: T5Config
  prompt_factory: Optional[PromptFactory] = None
  hooks: Optional[Hooks] = None

  def setup(self):
    cfg = self.config
    self.token_embedder = _make_embed(cfg)
    self.encoder = Encoder(
        cfg,
        shared_embedder=self.token_embedder,
        prompt_factory=self.prompt_factory,
        hooks=self.hooks,
    )
    self.decoder = Decoder(cfg, shared_embedder=self.token_embedder, hooks=self.hooks)
    self.shared_hooks = hooks_lib.build_shared(self.hooks)

  def encoder_input_mask(self, encoder_input_tokens: Array) -> Array:
    """Boolean `[B, L']`: which encoded positions are real (prompt positions included)."""
    return self.encoder.input_mask(encoder_input_tokens)

  def encode(
      self,
      encoder_input_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      encoder_positions: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Encodes `[B, L]` tokens -> `[B, L', d_model]` (`L' = P + L` with a prompt).

    `features` are per-example integer features (`prompt_ids`, `task_ids`, ...) for the prompt
    module and the hooks; `prompt_ids=` is the same as `features={'prompt_ids': ...}`.
    """
    del encoder_positions  # Relative position biases only need the (packed) segment masks.
    if self.prompt_factory is not None and encoder_segment_ids is not None:
      raise ValueError(PACKING_WITH_PROMPT_ERROR)
    features = _features(features, prompt_ids)
    m = masks_lib.encoder_masks(
        encoder_input_tokens,
        encoder_segment_ids,
        combine_mask=self.encoder.layout(),
        attention_policy=self.encoder.attention_policy(),
    )
    x = self.encoder.embed(encoder_input_tokens, enable_dropout=enable_dropout, features=features)
    ctx = hooks_lib.Context(features=features, prompt_mask=m.prompt_mask, input_mask=m.input_mask)
    ctx = hooks_lib.with_shared(self.shared_hooks, ctx)
    return self.encoder(x, m.attention_mask, m.input_mask, ctx=ctx, enable_dropout=enable_dropout)

  def decode(
      self,
      encoded: Array,
      encoder_input_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      decoder_positions: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Decoder branch -> float32 logits `[B, T, vocab]`.

    `encoder_input_tokens` is only used for the cross-attention mask. With `decode=True` the
    call may carry a chunk of `n >= 1` tokens (see `layers.MultiHeadDotProductAttention`).
    `features` reach the decoder's hooks.
    """
    del decoder_positions
    if self.prompt_factory is not None and (
        encoder_segment_ids is not None or decoder_segment_ids is not None
    ):
      raise ValueError(PACKING_WITH_PROMPT_ERROR)
    features = _features(features, prompt_ids)
    encoder_mask = self.encoder_input_mask(encoder_input_tokens)
    m = masks_lib.decoder_masks(
        decoder_input_tokens,
        decoder_target_tokens,
        segment_ids=decoder_segment_ids,
        decode=decode,
    )
    cross_mask = masks_lib.encoder_decoder_mask(
        m.query_mask, encoder_mask, decoder_segment_ids, encoder_segment_ids, decode=decode
    )
    x = self.decoder.embed(decoder_input_tokens, enable_dropout=enable_dropout, decode=decode)
    ctx = hooks_lib.Context(
        features=features, input_mask=None if decode else m.query_mask, decode=decode
    )
    ctx = hooks_lib.with_shared(self.shared_hooks, ctx)
    return self.decoder(
        x,
        encoded,
        self_mask=m.self_mask,
        cross_mask=cross_mask,
        logit_mask=m.logit_mask,
        ctx=ctx,
        enable_dropout=enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
    )

  def __call__(
      self,
      encoder_input_tokens: Array,
      decoder_input_tokens: Array,
      decoder_target_tokens: Array,
      encoder_segment_ids: Optional[Array] = None,
      decoder_segment_ids: Optional[Array] = None,
      encoder_positions: Optional[Array] = None,
      decoder_positions: Optional[Array] = None,
      *,
      enable_dropout: bool = True,
      decode: bool = False,
      max_decode_length: Optional[int] = None,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Full model -> float32 logits `[B, T, vocab]`."""
    features = _features(features, prompt_ids)
    encoded = self.encode(
        encoder_input_tokens,
        encoder_segment_ids,
        encoder_positions,
        enable_dropout=enable_dropout,
        features=features,
    )
    return self.decode(
        encoded,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_segment_ids,
        decoder_segment_ids,
        decoder_positions,
        enable_dropout=enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
        features=features,
    )


class DecoderOnly(nn.Module):
  """T5-style decoder-only language model (causal or prefix LM), flaxformer `DecoderOnly`.

  Attributes:
    config: the backbone hyper-parameters (`num_decoder_layers` layers).
    prompt_factory: returns the prompt module stored as `decoder/prompt`.
    hooks: the methods' hooks, or None.
  """

  config: T5Config
  prompt_factory: Optional[PromptFactory] = None
  hooks: Optional[Hooks] = None

  def setup(self):
    self.decoder = Decoder(
        self.config,
        shared_embedder=None,
        prompt_factory=self.prompt_factory,
        decoder_only=True,
        hooks=self.hooks,
    )
    self.shared_hooks = hooks_lib.build_shared(self.hooks)

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
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Returns float32 logits `[B, T', vocab]` (`T' = P + T` with a prompt and `decode=False`).

    Causal LM when `decoder_causal_attention is None`; prefix LM otherwise (positions with
    `decoder_causal_attention == 1`, and the prompt, see each other bidirectionally). With
    `decode=True` a chunk of tokens is appended to the cache; `prefill_prompt=True` appends the
    prompt `[B, P, d]` instead, or with `decoder_causal_attention` the prompt and the prefix
    tokens in one chunk.
    """
    del decoder_positions
    has_prompt = self.prompt_factory is not None
    if has_prompt and decoder_segment_ids is not None:
      raise ValueError(PACKING_WITH_PROMPT_ERROR)
    if prefill_prompt and not (decode and has_prompt):
      raise ValueError('prefill_prompt=True needs decode=True and a prompt module.')
    features = _features(features, prompt_ids)
    tokens = decoder_input_tokens
    prefill_prefix = prefill_prompt and decoder_causal_attention is not None
    x = self.decoder.embed(
        tokens,
        enable_dropout=enable_dropout,
        decode=decode,
        prefill_prompt=prefill_prompt,
        prefill_prefix=prefill_prefix,
        features=features,
    )
    m = masks_lib.decoder_masks(
        tokens,
        None if decode else decoder_target_tokens,
        causal_attention=decoder_causal_attention,
        segment_ids=decoder_segment_ids,
        decode=decode,
        combine_mask=self.decoder.layout(),
        prompt_in_chunk=prefill_prefix,
        length=x.shape[1],
        attention_policy=self.decoder.attention_policy(),
    )
    prompt_mask = m.prompt_mask
    if prefill_prompt and not prefill_prefix:
      prompt_mask = jnp.ones(x.shape[:2], bool)  # The chunk is the prompt alone.
    ctx = hooks_lib.Context(
        features=features,
        prompt_mask=prompt_mask,
        input_mask=None if decode else m.query_mask,
        decode=decode,
    )
    ctx = hooks_lib.with_shared(self.shared_hooks, ctx)
    return self.decoder(
        x,
        None,
        self_mask=m.self_mask,
        cross_mask=None,
        logit_mask=m.logit_mask,
        chunk_mask=m.chunk_mask,
        ctx=ctx,
        enable_dropout=enable_dropout,
        decode=decode,
        max_decode_length=max_decode_length,
    )


# ----------------------------------------------------------------------------------------------
# Parameter utilities
# ----------------------------------------------------------------------------------------------


# The library's one `/`-path helper (`prompt_tuning.params`); these names stay for the callers that
# use them through this module.

flatten_params = params_lib.flatten_params
unflatten_params = params_lib.unflatten_params


def make_model(
    config: T5Config,
    *,
    decoder_only: bool = False,
    prompt_factory: Optional[PromptFactory] = None,
    hooks: Optional[Hooks] = None,
) -> nn.Module:
  """`EncoderDecoder(config)` or `DecoderOnly(config)`, with an optional prompt and hooks."""
  cls = DecoderOnly if decoder_only else EncoderDecoder
  return cls(config, prompt_factory=prompt_factory, hooks=hooks)


def init_variables(
    config: T5Config,
    rng: Optional[Array] = None,
    *,
    decoder_only: bool = False,
    prompt_factory: Optional[PromptFactory] = None,
    abstract: bool = False,
    hooks: Optional[Hooks] = None,
) -> Dict[str, Any]:
  """`model.init` on dummy length-1 inputs: `{'params': ..., 'params_axes': ...}`.

  With `abstract=True` nothing is computed (`jax.eval_shape`) and leaves are ShapeDtypeStructs.
  """
  model = make_model(config, decoder_only=decoder_only, prompt_factory=prompt_factory, hooks=hooks)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  ones = jnp.ones((1, 1), jnp.int32)

  def init(key):
    if decoder_only:
      return model.init(key, ones, ones, enable_dropout=False)
    return model.init(key, ones, ones, ones, enable_dropout=False)

  if abstract:
    return jax.eval_shape(init, rng)
  return init(rng)


def get_token_embedding(params: Mapping[str, Any]) -> Array:
  """The input embedding `[vocab, d]` of an encoder-decoder or decoder-only parameter tree."""
  if 'token_embedder' in params:
    return params['token_embedder']['embedding']
  return params['decoder']['token_embedder']['embedding']


_LAYER_RE = re.compile(r'^(encoder|decoder)/layers_(\d+)/')
_QUERY_PATHS = (
    'encoder/layers_0/attention/query/kernel',
    'decoder/layers_0/self_attention/query/kernel',
)
_MLP_PREFIXES = ('encoder/layers_0/mlp/', 'decoder/layers_0/mlp/')


def _shape_of(value: Any) -> Optional[Tuple[int, ...]]:
  """A leaf's shape: arrays and shape structs (`.shape`), shapes, `(shape, dtype)` pairs."""
  if hasattr(value, 'shape'):
    return tuple(int(d) for d in value.shape)
  if isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)):
    return tuple(int(d) for d in value[0])  # t5x_format.list_variables: (shape, dtype name).
  if isinstance(value, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in value):
    return tuple(int(d) for d in value)
  return None


def param_shapes(params_or_shapes: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
  """`{'a/b': shape}` from a nested tree or a flat `/`-keyed dict of arrays, shapes or `(shape, dtype)`.

  Leaves without a shape are left out.
  """
  is_flat = bool(params_or_shapes) and all(
      isinstance(k, str) and '/' in k for k in params_or_shapes
  )
  flat = dict(params_or_shapes) if is_flat else flatten_params(params_or_shapes)
  out = {}
  for path, value in flat.items():
    shape = _shape_of(value)
    if shape is not None:
      out[path] = shape
  return out


def _attention_width(shapes: Mapping[str, Tuple[int, ...]]) -> Optional[int]:
  """`num_heads * head_dim` read off the first attention query kernel, or None."""
  for path in _QUERY_PATHS:
    if path in shapes:
      query = shapes[path]
      return query[1] * query[2] if len(query) == 3 else query[1]
  return None


def config_fields_from_shapes(params_or_shapes: Mapping[str, Any]) -> Dict[str, Any]:
  """The `T5Config` fields that parameter shapes determine (the one shape-to-config reader).

  Works for encoder-decoder and decoder-only trees and never reads an array. A field the shapes do
  not determine is absent: `num_heads` needs a relative-position embedding (or 3-D attention
  kernels), and `head_dim` needs `num_heads` and an attention kernel.

  Args:
    params_or_shapes: a nested parameter tree (flaxformer names; arrays or shape structs), a flat
      `{'a/b': array}` dict, a flat `{'a/b': shape}` dict, or the output of
      `prompt_tuning.checkpoints.t5x_format.list_variables`.

  Returns:
    Some of `vocab_size, emb_dim, num_heads, head_dim, mlp_dim, num_encoder_layers,
    num_decoder_layers, mlp_activations, logits_via_embedding, relative_attention_num_buckets`.
    The layer counts are always present (0 for a stack without layers).
  """
  shapes = param_shapes(params_or_shapes)
  fields: Dict[str, Any] = {}
  emb = shapes.get('token_embedder/embedding') or shapes.get('decoder/token_embedder/embedding')
  if emb is not None and len(emb) == 2:
    fields['vocab_size'], fields['emb_dim'] = emb
  layers: Dict[str, set] = {'encoder': set(), 'decoder': set()}
  for path in shapes:
    m = _LAYER_RE.match(path)
    if m:
      layers[m.group(1)].add(int(m.group(2)))
  for stack, idx in layers.items():
    fields[f'num_{stack}_layers'] = max(idx) + 1 if idx else 0
  relpos = shapes.get('encoder/relpos_bias/rel_embedding') or shapes.get(
      'decoder/relpos_bias/rel_embedding'
  )
  if relpos is not None:
    fields['num_heads'], fields['relative_attention_num_buckets'] = relpos[0], relpos[1]
  query = next((shapes[p] for p in _QUERY_PATHS if p in shapes), None)
  if query is not None and len(query) == 3:
    fields['num_heads'], fields['head_dim'] = query[1], query[2]
  elif query is not None and fields.get('num_heads') and query[1] % fields['num_heads'] == 0:
    fields['head_dim'] = query[1] // fields['num_heads']
  for prefix in _MLP_PREFIXES:
    if prefix + 'wi_0/kernel' in shapes:
      fields['mlp_dim'] = shapes[prefix + 'wi_0/kernel'][-1]
      n_wi = len({p[len(prefix) :].split('/')[0] for p in shapes if p.startswith(prefix + 'wi_')})
      fields['mlp_activations'] = ('gelu', 'linear') if n_wi == 2 else ('gelu',) * n_wi
      break
    if prefix + 'wi/kernel' in shapes:
      fields['mlp_dim'] = shapes[prefix + 'wi/kernel'][-1]
      fields['mlp_activations'] = ('relu',)
      break
  if any(p.startswith('decoder/') for p in shapes):
    fields['logits_via_embedding'] = 'decoder/logits_dense/kernel' not in shapes
  return fields


def _norm(value: Any) -> Any:
  return tuple(value) if isinstance(value, (list, tuple)) else value


def config_from_shapes(
    params_or_shapes: Mapping[str, Any],
    preset: Optional[str] = None,
    head_dim: int = 64,
    **overrides: Any,
) -> T5Config:
  """A `T5Config` for an encoder-decoder parameter tree: preset, inferred shapes, overrides.

  Without `preset`, the T5 1.1 base preset (gated MLP) or the T5 1.0 base preset (ReLU MLP)
  supplies what shapes cannot tell (dropout, maximum relative distance, ...) and every shape field
  is inferred (`config_fields_from_shapes`); the head count comes from the relative-position
  embedding, else from `head_dim` (default 64). With a `preset`, its values are used and checked
  against the shapes: a mismatch is an error naming every disagreeing field. `overrides` are
  applied last and are not checked.

  Args:
    params_or_shapes: see `config_fields_from_shapes`.
    preset: a `get_config` preset name.
    head_dim: head size assumed when nothing in the tree fixes it.
    **overrides: T5Config fields to set.

  Raises:
    ValueError: the tree is not a T5 encoder-decoder, or its shapes contradict themselves or the
      preset.
  """
  shapes = param_shapes(params_or_shapes)
  if 'token_embedder/embedding' not in shapes or not any(k.startswith('encoder/') for k in shapes):
    raise ValueError(
        'Cannot infer a T5 configuration: the parameters have no "token_embedder/embedding" or no '
        f'"encoder/..." (is this a T5 encoder-decoder checkpoint?). Some names: {sorted(shapes)[:5]}.'
    )
  fields = config_fields_from_shapes(shapes)
  width = _attention_width(shapes)
  if width and 'num_heads' in fields and 'head_dim' not in fields:
    raise ValueError(
        f'Attention width {width} is not a multiple of the {fields["num_heads"]} heads given by '
        'the relative-position embedding.'
    )
  heads_known = 'head_dim' in fields
  if preset is None:
    if not heads_known and width:
      hd = overrides.get('head_dim', head_dim)
      if 'num_heads' in overrides:
        hd = width // overrides['num_heads']
      if width % hd:
        raise ValueError(
            f'Attention width {width} is not a multiple of head_dim {hd}; pass head_dim/num_heads '
            'or a --config preset.'
        )
      fields['num_heads'], fields['head_dim'] = width // hd, hd
    gated = len(fields.get('mlp_activations', ('gelu', 'linear'))) > 1
    config = dataclasses.replace(get_config('t5_1_1_base' if gated else 't5_1_0_base'), **fields)
  else:
    config = get_config(preset)
    mismatches = []
    for name, value in fields.items():
      if name in overrides:
        continue
      have = getattr(config, name, None)
      if name == 'mlp_activations':  # Spellings vary; gating must agree.
        same = len(_norm(have)) == len(_norm(value))
      else:
        same = _norm(have) == _norm(value)
      if not same:
        mismatches.append(f'{name}: preset {have!r}, checkpoint {value!r}')
    if not heads_known and width and not ('num_heads' in overrides or 'head_dim' in overrides):
      if config.num_heads * config.head_dim != width:
        mismatches.append(
            f'num_heads*head_dim: preset {config.num_heads}*{config.head_dim}, checkpoint '
            f'attention width {width}'
        )
    if mismatches:
      raise ValueError(
          f'The checkpoint does not match preset {preset!r}: '
          + '; '.join(mismatches)
          + '. Pick a matching preset, or omit it to infer the configuration from the shapes.'
      )
  if overrides:
    config = dataclasses.replace(config, **overrides)
  return config


def _matching_presets(fields: Mapping[str, Any], width: Optional[int]) -> list:
  out = []
  for name, cfg in PRESETS.items():
    if name == 'tiny':
      continue
    if (
        fields.get('emb_dim') == cfg.emb_dim
        and fields.get('mlp_dim') == cfg.mlp_dim
        and width in (None, cfg.num_heads * cfg.head_dim)
        and fields.get('num_encoder_layers') in (0, cfg.num_encoder_layers)
        and fields.get('vocab_size') == cfg.vocab_size
        and (len(fields.get('mlp_activations', ())) > 1) == (len(cfg.mlp_activations) > 1)
    ):
      out.append(name)
  return out


def check_params(
    config: T5Config,
    params: Mapping[str, Any],
    *,
    decoder_only: bool = False,
    ignore: str = r'(.*/)?prompt/.*',
    what: str = 'checkpoint',
) -> None:
  """Checks that `params` has exactly the parameter names and shapes `config` expects.

  Args:
    config: the model config the parameters are meant for.
    params: nested parameter dict (arrays or anything with a `.shape`).
    decoder_only: compare against `DecoderOnly` instead of `EncoderDecoder`.
    ignore: regex of flattened paths to skip in both trees (default: prompt parameters).
    what: how to call the source of `params` in the message.

  Raises:
    ValueError: naming the first mismatching parameter path, the expected and found shapes, and
      the likely cause (size preset, vocabulary / NUM_EMBEDDINGS, T5 1.0 vs 1.1).
  """
  expected = flatten_params(
      init_variables(config, decoder_only=decoder_only, abstract=True)['params']
  )
  found = flatten_params(params)
  skip = re.compile(ignore) if ignore else None
  expected = {k: tuple(v.shape) for k, v in expected.items() if not (skip and skip.fullmatch(k))}
  found = {k: tuple(np.shape(v)) for k, v in found.items() if not (skip and skip.fullmatch(k))}
  if expected == found:
    return

  info = config_fields_from_shapes(found)
  width = _attention_width(found)
  presets = _matching_presets(info, width)
  preset_hint = f' The {what} matches preset(s) {", ".join(presets)}.' if presets else ''
  cfg_gated = len(config.mlp_activations) > 1
  found_gated = len(info.get('mlp_activations', ())) > 1
  found_relu = tuple(info.get('mlp_activations', ())) == ('relu',)
  found_logits_dense = 'decoder/logits_dense/kernel' in found
  mismatched, missing, unexpected = [], [], []
  for path in list(expected) + [p for p in found if p not in expected]:  # model order
    exp, got = expected.get(path), found.get(path)
    if exp == got:
      continue
    if exp is not None and got is not None:
      mismatched.append(
          f"parameter '{path}': expected shape {exp} for this config, found " f'{got} in the {what}'
      )
    elif got is None:
      missing.append(f"parameter '{path}' (shape {exp}) is missing from the {what}")
    else:
      unexpected.append(f"unexpected parameter '{path}' (shape {got}) in the {what}")
  rank = lambda msg: (0 if 'token_embedder/' in msg else 1 if "'encoder/" in msg else 2)
  problems = sorted(mismatched, key=rank) + sorted(missing, key=rank) + sorted(unexpected, key=rank)

  causes = []
  if info.get('vocab_size') is not None and info['vocab_size'] != config.vocab_size:
    causes.append(
        f'Wrong vocabulary size: the {what} has {info["vocab_size"]} embeddings but the config '
        f'has vocab_size={config.vocab_size}. Set NUM_EMBEDDINGS / vocab_size to '
        f'{info["vocab_size"]} (T5 and T5 1.1 use 32128, mT5 250112) and use the matching '
        'vocabulary.'
    )
  if (
      (found_gated and not cfg_gated)
      or (found_relu and cfg_gated)
      or (
          found_logits_dense == config.logits_via_embedding
          and any(p.startswith('decoder/') for p in found)
      )
  ):
    ckpt_kind = (
        'T5 1.1-style (gated-GELU wi_0/wi_1, separate logits_dense)'
        if found_gated or found_logits_dense
        else 'T5 1.0-style (ReLU wi, logits tied to the embedding)'
    )
    cfg_kind = (
        'T5 1.0 (mlp_activations=("relu",), logits_via_embedding=True)'
        if config.logits_via_embedding or not cfg_gated
        else 'T5 1.1 (mlp_activations=("gelu","linear"), logits_via_embedding=False)'
    )
    causes.append(
        f'T5 1.0 vs 1.1 mismatch: the {what} is {ckpt_kind} but the config is '
        f'{cfg_kind}; use a t5_1_0_* preset for T5 1.0 checkpoints and t5_1_1_* / '
        'mt5_* for T5 1.1, LM-adapted and mT5 checkpoints.'
    )
  info['inner_dim'] = width
  size_fields = [
      ('emb_dim', config.emb_dim),
      ('mlp_dim', config.mlp_dim),
      ('inner_dim', config.num_heads * config.head_dim),
      ('num_heads', config.num_heads),
      ('num_encoder_layers', 0 if decoder_only else config.num_encoder_layers),
      ('num_decoder_layers', config.num_decoder_layers),
  ]
  diffs = [
      f'{k} {info[k]} vs {v}' for k, v in size_fields if info.get(k) is not None and info[k] != v
  ]
  if diffs:
    causes.append(
        f'Wrong model size preset: {what} vs config differ in '
        f'{", ".join(diffs)} (e.g. t5_1_1_base has d_model 768, t5_1_1_large '
        f'1024).{preset_hint}'
    )
  if not causes:
    causes.append(f'The {what} does not have the parameter layout of this config.{preset_hint}')
  shown = problems[:8]
  more = f'\n  ... and {len(problems) - len(shown)} more' if len(problems) > len(shown) else ''
  raise ValueError(
      f'The {what} does not match the model config: '
      + ' '.join(causes)
      + '\n  '
      + '\n  '.join(shown)
      + more
  )


# T5X's examples/t5/network.py calls the encoder-decoder `Transformer`; the alias lets gin files written
# for it (`network.Transformer.config = @network.T5Config()`) work after changing only the import line.
Transformer = EncoderDecoder
