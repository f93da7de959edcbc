"""A float64 numpy transcription of T5 1.1 with the places methods act, for the methods' oracles.

Written from the T5/flaxformer equations, independently of `prompt_tuning/architectures`: RMSNorm,
attention without 1/sqrt(d) scaling plus the relative-position bias of layer 0 shared by all
layers (bidirectional buckets in the encoder, causal in the decoder, none in cross-attention),
gated-GELU (tanh approximation) MLP, untied logits. The masks are flaxformer's: pad keys are hidden,
decoder self-attention is causal, and the normalized inputs of padding positions are zeroed.

Methods enter through keyword arguments:

* `prompt`: `[P, H]` prepended to the embedded encoder inputs (prompt positions are real);
* `embed_update`: `[L, H]` added to the embedded encoder inputs before the prompt (DePT);
* `layer_input(i, x, prompt_mask) -> x`: each encoder layer's input (per-layer prompts);
* `prefixes`: `{(stack, layer, block): (K [n, heads, dh], V)}` prefix keys/values; prefix key j
  sits at position j and token t at `n + t` in the relative-position bias.
"""

from typing import Callable, Mapping, Optional, Tuple

import numpy as np

from prompt_tuning import params as params_lib


def bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
  """T5's relative-position bucket of `memory - query` (Raffel et al.; Mesh TensorFlow)."""
  ret = np.zeros_like(relative_position)
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact)
      * (num_buckets - max_exact)
  ).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return ret + np.where(n < max_exact, n, large)


def gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def rms_norm(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


class NumpyT5:
  """T5 1.1 in float64 numpy from a parameter tree with our (flaxformer) names."""

  def __init__(self, params: Mapping[str, object], num_heads: int):
    self.p = {k: np.asarray(v, np.float64) for k, v in params_lib.flatten_params(params).items()}
    self.heads = num_heads

  def _attention(self, prefix, x_q, x_kv, mask, bias, prefix_kv=None, kv_transform=None):
    p = self.p
    b, lq, _ = x_q.shape
    h = self.heads
    q = (x_q @ p[prefix + 'query/kernel']).reshape(b, lq, h, -1)
    k = (x_kv @ p[prefix + 'key/kernel']).reshape(b, x_kv.shape[1], h, -1)
    v = (x_kv @ p[prefix + 'value/kernel']).reshape(b, x_kv.shape[1], h, -1)
    if kv_transform is not None:
      k, v = kv_transform(k, v)
    n = 0
    if prefix_kv is not None:
      pk, pv = prefix_kv
      n = pk.shape[0]
      k = np.concatenate([np.broadcast_to(pk, (b,) + pk.shape), k], axis=1)
      v = np.concatenate([np.broadcast_to(pv, (b,) + pv.shape), v], axis=1)
      mask = np.concatenate([np.ones(mask.shape[:-1] + (n,), bool), mask], axis=-1)
    logits = np.einsum('bqhd,bkhd->bhqk', q, k)
    if bias is not None:
      logits = logits + bias
    logits = np.where(mask[:, None], logits, -1e10)
    out = np.einsum('bhqk,bkhd->bqhd', softmax(logits), v).reshape(b, lq, -1)
    return out @ p[prefix + 'out/kernel']

  def _bias(self, stack, q_pos, k_pos, bidirectional):
    table = self.p[f'{stack}/relpos_bias/rel_embedding']  # [heads, buckets]
    buckets = bucket(k_pos[None, :] - q_pos[:, None], bidirectional, table.shape[1])
    return table[:, buckets][None]  # [1, heads, q, k]

  def _mlp(self, prefix, x, ff_scale=None):
    p = self.p
    hidden = gelu(x @ p[prefix + 'wi_0/kernel']) * (x @ p[prefix + 'wi_1/kernel'])
    if ff_scale is not None:
      hidden = hidden * ff_scale
    return hidden @ p[prefix + 'wo/kernel']

  def encode(
      self,
      tokens,
      prompt=None,
      embed_update=None,
      layer_input: Optional[Callable] = None,
      prefixes: Optional[Mapping[Tuple[str, int, str], Tuple[np.ndarray, np.ndarray]]] = None,
  ):
    """Encoder outputs `[B, P + L, H]` and the real-position mask `[B, P + L]`."""
    p = self.p
    x = p['token_embedder/embedding'][tokens]
    if embed_update is not None:
      x = x + embed_update[None, : x.shape[1]]
    real = tokens > 0
    prompt_mask = np.zeros_like(real)
    if prompt is not None:
      b, n = tokens.shape[0], prompt.shape[0]
      x = np.concatenate([np.broadcast_to(prompt, (b,) + prompt.shape), x], axis=1)
      real = np.concatenate([np.ones((b, n), bool), real], axis=1)
      prompt_mask = np.concatenate([np.ones((b, n), bool), np.zeros(tokens.shape, bool)], axis=1)
    mask = real[:, None, :] & real[:, :, None]
    prefixes = prefixes or {}
    num_layers = len({k.split('/')[1] for k in p if k.startswith('encoder/layers_')})
    for i in range(num_layers):
      if layer_input is not None:
        x = layer_input(i, x, prompt_mask)
      pre = f'encoder/layers_{i}/'
      pkv = prefixes.get(('encoder', i, 'attention'))
      n = 0 if pkv is None else pkv[0].shape[0]
      length = x.shape[1]
      bias = self._bias('encoder', n + np.arange(length), np.arange(n + length), True)
      y = rms_norm(x, p[pre + 'pre_attention_layer_norm/scale']) * real[..., None]
      x = x + self._attention(pre + 'attention/', y, y, mask, bias, pkv)
      y = rms_norm(x, p[pre + 'pre_mlp_layer_norm/scale']) * real[..., None]
      x = x + self._mlp(pre + 'mlp/', y)
    return rms_norm(x, p['encoder/encoder_norm/scale']) * real[..., None], real

  def decode(
      self, encoded, encoder_real, decoder_input_tokens, decoder_target_tokens, prefixes=None
  ):
    """Logits `[B, T, vocab]`."""
    p = self.p
    prefixes = prefixes or {}
    x = p['token_embedder/embedding'][decoder_input_tokens]
    real = decoder_target_tokens > 0
    length = x.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    self_mask = causal[None] & real[:, None, :] & real[:, :, None]
    cross_mask = real[:, :, None] & encoder_real[:, None, :]
    num_layers = len({k.split('/')[1] for k in p if k.startswith('decoder/layers_')})
    for i in range(num_layers):
      pre = f'decoder/layers_{i}/'
      pkv = prefixes.get(('decoder', i, 'self_attention'))
      n = 0 if pkv is None else pkv[0].shape[0]
      bias = self._bias('decoder', n + np.arange(length), np.arange(n + length), False)
      y = rms_norm(x, p[pre + 'pre_self_attention_layer_norm/scale']) * real[..., None]
      x = x + self._attention(pre + 'self_attention/', y, y, self_mask, bias, pkv)
      y = rms_norm(x, p[pre + 'pre_cross_attention_layer_norm/scale']) * real[..., None]
      cross = prefixes.get(('decoder', i, 'encoder_decoder_attention'))
      x = x + self._attention(
          pre + 'encoder_decoder_attention/', y, encoded, cross_mask, None, cross
      )
      y = rms_norm(x, p[pre + 'pre_mlp_layer_norm/scale']) * real[..., None]
      x = x + self._mlp(pre + 'mlp/', y)
    x = rms_norm(x, p['decoder/decoder_norm/scale']) * real[..., None]
    return x @ p['decoder/logits_dense/kernel']

  def loss(self, enc, tgt, **kw):
    """Mean token cross entropy over the real targets (the method keyword arguments as `encode`)."""
    dec_prefixes = kw.pop('decoder_prefixes', None)
    encoded, enc_real = self.encode(enc, **kw)
    dec_in = np.concatenate([np.zeros((tgt.shape[0], 1), tgt.dtype), tgt[:, :-1]], axis=1)
    logits = self.decode(encoded, enc_real, dec_in, tgt, dec_prefixes)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    w = (tgt > 0).astype(np.float64)
    return float((ce * w).sum() / w.sum())


def finite_difference(f: Callable[[np.ndarray], float], x: np.ndarray, index, eps: float = 1e-5):
  """Central difference of `f` at `x` along the coordinate `index` (float64)."""
  a = np.array(x, np.float64)
  b = np.array(x, np.float64)
  a[index] += eps
  b[index] -= eps
  return (f(a) - f(b)) / (2 * eps)
