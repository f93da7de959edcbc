"""ATTEMPT (Asai et al. 2022): a per-example attention-weighted mixture of frozen source prompts.

Frozen source prompts `P_1..P_t` `[l, H]` (trained earlier, one per source task; from `.npy`
files or a bank), a trainable target prompt `P_tgt` and a small attention module shared across
target tasks give each example b its own prompt (AkariAsai/ATTEMPT, attention method "sub"):

    x_b  = max over the input positions of the embedded inputs           [H]
    z_b  = LayerNorm(W_up silu(W_down x_b))                              [H]   (no biases in W)
    C    = [P_1, ..., P_t, P_tgt]      (the target is a candidate unless `include_target=False`)
    a_b  = softmax_j( (max over positions of C_j) . z_b / T )            [t + 1]
    P_b  = sum_j a_bj C_j + P_tgt                                        [l, H]

with `T = temperature` (default `H * e`: the 2087 of the released configs for H = 768) and
LayerNorm as PyTorch's (biased variance, eps 1e-5, scale and bias). With several target tasks
(`num_targets > 1`) each example's `task_ids` feature picks its target prompt; the attention
module is shared. Padding is left out of the input max-pool (the original code pools the padding
embeddings too: `pool_padding=True`).

Each example's mixture weights `a_b` are sown into `hooks.PER_EXAMPLE_OUTPUTS` as
`mixture_weights`: `prompt_tuning.infer` in `mode='predict_with_aux'` writes them into the JSONL
(`aux.mixture_weights`, sources in order, the target last), so users see which sources each
example used.

Parameters (under `.../prompt/prompt/`): `source_prompts` `[t, l, H]` (frozen: keep it out of
the trainable regex; re-read from `source_init` at every start), `target_prompt`
`[num_targets, l, H]`, `attention/down_kernel` `[H, r]`, `attention/up_kernel` `[r, H]`,
`attention/norm_scale`, `attention/norm_bias` `[H]`. `configs/methods/attempt.gin` trains
`target_prompt` and `attention/*`.

An encoder-decoder method (the prompt depends on the inputs): decoder-only causal LMs, which
prefill the prompt before any input, are not supported.
"""

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_tuning import prompts
from prompt_tuning.architectures import hooks
from prompt_tuning.methods import composition

Array = Any
DType = Any
Initializer = prompts.Initializer

PROMPT_AXES = ('tasks', 'prompt', 'prompt_embed')
MIXTURE_WEIGHTS = 'mixture_weights'


def stack_files(paths: Sequence[str]) -> Callable[[], np.ndarray]:
  """A loader of `[t, l, H]`: the `[l, H]` prompts in `paths` (`.npy`), stacked in order."""
  paths = tuple(paths)

  def load():
    arrays = [np.asarray(prompts.np_load(p), np.float32) for p in paths]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
      raise ValueError(
          f'ATTEMPT source prompts differ in shape: {dict(zip(paths, [a.shape for a in arrays]))}.'
      )
    return np.stack(arrays)

  return load


def layer_norm(x: Array, scale: Array, bias: Array, eps: float = 1e-5) -> Array:
  """PyTorch's `nn.LayerNorm` over the last axis (biased variance)."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


class AttemptAttention(nn.Module):
  """`z = LayerNorm(W_up silu(W_down x))` (the attention module, shared across targets)."""

  bottleneck: int = 100
  kernel_init: Initializer = nn.initializers.lecun_normal()
  params_dir: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = x.shape[-1]
    down = composition.param(
        self, 'down_kernel', self.kernel_init, (h, self.bottleneck), ('prompt_embed', None)
    )
    up = composition.param(
        self, 'up_kernel', self.kernel_init, (self.bottleneck, h), (None, 'prompt_embed')
    )
    scale = composition.param(self, 'norm_scale', nn.initializers.ones, (h,), ('prompt_embed',))
    bias = composition.param(self, 'norm_bias', nn.initializers.zeros, (h,), ('prompt_embed',))
    return layer_norm(jax.nn.silu(x @ down) @ up, scale, bias)


class AttemptPrompt(nn.Module):
  """The instance prompts of ATTEMPT (see the module docstring).

  Attributes:
    length: l, the prompt length (of the sources and the target).
    num_sources: t.
    source_init: initializer of the `[t, l, H]` source prompts, e.g.
      `prompts.from_array(stack_files([...]))` or `prompts.from_array(prompts.np_load(bank))`.
    target_init: initializer of one `[l, H]` target prompt (each target gets its own key).
    num_targets: target tasks sharing the attention module (picked by `task_feature`).
    bottleneck: r, the width of the attention module's bottleneck (100 in the paper).
    temperature: T (None: `H * e`).
    include_target: the target prompt is a mixture candidate (the released configs).
    pool_padding: max-pool padding embeddings too (as the original code does).
    task_feature: the per-example feature naming the target task.
    embed_dim: H (inferred when None).
    dtype: activation dtype.
    params_dir: serve from exported `.npy` parameters (see `composition.param`).
  """

  length: int
  num_sources: int
  source_init: Initializer = prompts.uniform(0.5)
  target_init: Initializer = prompts.uniform(0.5)
  num_targets: int = 1
  bottleneck: int = 100
  temperature: Optional[float] = None
  include_target: bool = True
  pool_padding: bool = False
  task_feature: str = 'task_ids'
  embed_dim: Optional[int] = None
  dtype: DType = jnp.float32
  params_dir: Optional[str] = None

  def _target_init(self, rng, shape):
    keys = jax.random.split(rng, shape[0])
    return jnp.stack([jnp.asarray(self.target_init(k, shape[1:]), jnp.float32) for k in keys])

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
      features: Optional[Mapping[str, Array]] = None,
  ) -> Array:
    """Returns the instance prompts `[B, l, H]` (and sows the mixture weights `[B, t(+1)]`)."""
    del prompt_ids
    if embedded is None or tokens is None:
      raise ValueError(
          'ATTEMPT needs the embedded inputs to compose its prompt: use it in the encoder of an '
          'encoder-decoder model (a decoder-only causal LM prefills the prompt before the inputs).'
      )
    h = self.embed_dim or embedded.shape[-1]
    l, t = self.length, self.num_sources
    sources = composition.param(
        self, 'source_prompts', self.source_init, (t, l, h), PROMPT_AXES, saved=False
    )
    targets = composition.param(
        self, 'target_prompt', self._target_init, (self.num_targets, l, h), PROMPT_AXES
    )
    batch = tokens.shape[0]
    ids = composition.example_ids(self, features, self.task_feature, batch, self.num_targets)
    target = composition.take_rows(targets, ids)  # [B, l, H]

    x = embedded.astype(jnp.float32)
    if self.pool_padding:
      pooled = jnp.max(x, axis=1)
    else:
      real = (tokens > 0)[..., None]
      pooled = jnp.max(jnp.where(real, x, -jnp.inf), axis=1)
      pooled = jnp.where(jnp.any(real, axis=1), pooled, 0.0)  # all-padding rows (batch padding)
    z = AttemptAttention(self.bottleneck, params_dir=self.params_dir, name='attention')(pooled)

    source_keys = jnp.max(sources, axis=1)  # [t, H]
    scores = jnp.einsum('bh,jh->bj', z, source_keys)
    candidates = jnp.broadcast_to(sources[None], (batch, t, l, h))
    if self.include_target:
      target_key = jnp.max(target, axis=1)  # [B, H]
      scores = jnp.concatenate([scores, jnp.sum(z * target_key, axis=-1, keepdims=True)], axis=1)
      candidates = jnp.concatenate([candidates, target[:, None]], axis=1)
    temperature = self.temperature if self.temperature is not None else h * math.e
    weights = jax.nn.softmax(scores / temperature, axis=-1)  # [B, t(+1)]
    self.sow(hooks.PER_EXAMPLE_OUTPUTS, MIXTURE_WEIGHTS, weights)
    prompt = jnp.einsum('bj,bjlh->blh', weights, candidates) + target
    return prompt.astype(self.dtype)


def attempt_prompt_factory(
    length: int,
    num_sources: int,
    *,
    source_init: Initializer = prompts.uniform(0.5),
    target_init: Initializer = prompts.uniform(0.5),
    num_targets: int = 1,
    bottleneck: int = 100,
    temperature: Optional[float] = None,
    include_target: bool = True,
    pool_padding: bool = False,
    task_feature: str = 'task_ids',
    combine: Callable[..., Array] = prompts.prefix_prompt,
    attention_policy: Optional[Callable[..., Array]] = None,
    dtype: DType = jnp.float32,
    params_dir: Optional[str] = None,
) -> Callable[[], nn.Module]:
  """A `prompt_factory` of ATTEMPT instance prompts (arguments: `AttemptPrompt`)."""
  kwargs = dict(
      length=length,
      num_sources=num_sources,
      source_init=source_init,
      target_init=target_init,
      num_targets=num_targets,
      bottleneck=bottleneck,
      temperature=temperature,
      include_target=include_target,
      pool_padding=pool_padding,
      task_feature=task_feature,
      dtype=dtype,
      params_dir=params_dir,
  )
  return composition.make_factory(
      lambda: AttemptPrompt(parent=None, **kwargs), combine, length, attention_policy
  )
