"""The frozen backbone's fast layouts (`T5Config.fuse_kernels`, `fold_cross_attention`,
`attention_layout`, the decode's cached encoder keys/values) against the plain layout and a float64
numpy attention.

Every fast path keeps flaxformer's parameter tree; the references are the separate matmuls
(`fuse_kernels=False, fold_cross_attention=False`), flaxformer's einsum layout
(`attention_layout='bqhd'`), numpy float64 transcriptions of T5 attention and of the whole model
(`tests/methods/numpy_t5.py`), and decoding by full forward passes.
"""

import dataclasses
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_methods
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import hooks
from prompt_tuning.architectures import layers
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models

# Decoder targets (T=3) much shorter than the inputs (L=40): the cross-attention folds.
CFG = t5.get_config('tiny', vocab_size=50, num_decoder_layers=2)
PLAIN = dataclasses.replace(CFG, fuse_kernels=False, fold_cross_attention=False)
B, L, T = 3, 40, 3


def _batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(3, CFG.vocab_size, size=(B, L)).astype(np.int32)
  enc[1, 30:] = 0
  tgt = rng.integers(3, CFG.vocab_size, size=(B, T)).astype(np.int32)
  tgt[2, 2:] = 0
  dec_in = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1) * (tgt > 0)
  return enc, dec_in, tgt


ENC, DEC_IN, TGT = _batch()


@pytest.fixture(scope='module')
def params():
  variables = t5.init_variables(CFG, jax.random.PRNGKey(0))
  # Larger than the default init, so differences between layouts are not hidden by tiny logits.
  return jax.tree_util.tree_map(lambda x: x * 2.0 if x.ndim == 2 else x, variables['params'])


@functools.lru_cache(maxsize=None)
def _loss(config, hooks_obj=None):
  module = t5.EncoderDecoder(config, hooks=hooks_obj)

  def loss(params):
    logits = module.apply({'params': params}, ENC, DEC_IN, TGT, enable_dropout=False)
    return jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(TGT, config.vocab_size)), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_close_rel(a, b, rel):
  a, b = np.asarray(a), np.asarray(b)
  scale = max(np.abs(b).max(), 1e-30)
  assert np.abs(a - b).max() <= rel * scale, (np.abs(a - b).max(), scale)


def test_the_parameter_tree_is_flaxformers_in_every_layout():
  trees = {
      (fuse, fold): jax.tree_util.tree_map(
          lambda x: (x.shape, x.dtype),
          t5.init_variables(
              dataclasses.replace(CFG, fuse_kernels=fuse, fold_cross_attention=fold), abstract=True
          ),
      )
      for fuse in (False, True)
      for fold in (False, True)
  }
  assert len({str(t) for t in trees.values()}) == 1
  flat = params_lib.flatten_params(trees[True, True]['params'])
  for path in (
      'encoder/layers_0/attention/query/kernel',
      'encoder/layers_0/attention/key/kernel',
      'encoder/layers_0/attention/value/kernel',
      'decoder/layers_1/encoder_decoder_attention/key/kernel',
      'decoder/layers_1/mlp/wi_0/kernel',
      'decoder/layers_1/mlp/wi_1/kernel',
  ):
    assert path in flat, path
  assert not any('fused' in p for p in flat)


def _float64_logits(params):
  """Logits of a float64 numpy T5 (`tests/methods/numpy_t5.py`) and the positions to compare
  (numpy_t5 zeroes the padding positions' normalized inputs; flaxformer does not)."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'methods'))
  import numpy_t5  # pylint: disable=g-import-not-at-top

  flat = {k: np.asarray(v, np.float64) for k, v in params_lib.flatten_params(params).items()}
  numpy_model = numpy_t5.NumpyT5(flat, CFG.num_heads)
  return numpy_model.decode(*numpy_model.encode(ENC), DEC_IN, TGT), TGT > 0


@pytest.mark.parametrize(
    'fuse,fold', [(True, False), (False, True), (True, True)], ids=['fuse', 'fold', 'both']
)
def test_fast_layouts_equal_the_separate_matmuls_with_gradients(params, fuse, fold):
  """Model tuning trains the kernels themselves: logits and every gradient must agree.

  Fusing only concatenates kernels (the same sums): within 1e-6 of the separate matmuls. Folding
  associates the cross-attention's sums differently (`layers.folded_cross_attention`), so its
  float32 rounding is its own: like the two attention layouts below, the folded and the plain
  model are each held to a float64 numpy T5 and to each other at 2.5e-6 of the largest logit
  (measured on an AMD Zen 2: plain 1.3e-6 and folded 1.8e-6 from float64, 0.75-1.01e-6 apart,
  where 1e-6 failed; within 1e-6 of each other on a Zen 4)."""
  (ref_loss, ref_logits), ref_grads = _loss(PLAIN)(params)
  config = dataclasses.replace(CFG, fuse_kernels=fuse, fold_cross_attention=fold)
  (loss, logits), grads = _loss(config)(params)
  if fold:
    f64, real = _float64_logits(params)
    for out in (logits, ref_logits):
      _assert_close_rel(np.asarray(out)[real], f64[real], 2.5e-6)
  _assert_close_rel(logits, ref_logits, 2.5e-6 if fold else 1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  flat, ref_flat = params_lib.flatten_params(grads), params_lib.flatten_params(ref_grads)
  assert flat.keys() == ref_flat.keys()
  for path in ref_flat:
    _assert_close_rel(flat[path], ref_flat[path], 1e-5)


def _numpy_attention(q_in, kv_in, wq, wk, wv, wo, heads, mask):
  """T5 attention in float64 with projected keys and values (no 1/sqrt(d): it is in `wq`)."""
  q_in, kv_in, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (q_in, kv_in, wq, wk, wv, wo))
  b, t, _ = q_in.shape
  split = lambda x: x.reshape(x.shape[:2] + (heads, -1))
  q, k, v = split(q_in @ wq), split(kv_in @ wk), split(kv_in @ wv)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) + np.where(mask, 0.0, -1e10)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', w, v).reshape(b, t, -1) @ wo


def test_heads_first_attention_is_flaxformers_up_to_float32_rounding(params):
  """`attention_layout='bhqd'` (the default) against flaxformer's einsums (`'bqhd'`) and a float64
  numpy T5. The two float32 models differ by their summation order only: on this test's doubled
  weights each is 1.2-1.9e-6 (of the largest logit) from float64, and the two 1.2-1.5e-6 apart, so
  they are held to float64 and to each other at 2.5e-6 (the fused kernels above, the same sums
  in the same layout, stay within 1e-6)."""
  assert CFG.attention_layout == 'bhqd'
  flaxformer = dataclasses.replace(CFG, attention_layout='bqhd')
  (loss, logits), grads = _loss(CFG)(params)
  (ref_loss, ref_logits), ref_grads = _loss(flaxformer)(params)
  f64, real = _float64_logits(params)
  for out in (logits, ref_logits):
    _assert_close_rel(np.asarray(out)[real], f64[real], 2.5e-6)
  _assert_close_rel(logits, ref_logits, 2.5e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  flat, ref_flat = params_lib.flatten_params(grads), params_lib.flatten_params(ref_grads)
  for path in ref_flat:
    _assert_close_rel(flat[path], ref_flat[path], 1e-5)


@pytest.mark.parametrize('layout', layers.ATTENTION_LAYOUTS)
def test_each_attention_layout_equals_float64_numpy(layout):
  rng = np.random.default_rng(3)
  q, k, v = (rng.normal(size=(2, s, 4, 8)).astype(np.float32) for s in (5, 7, 7))
  bias = rng.normal(size=(1, 4, 5, 7)).astype(np.float32)
  out = layers.dot_product_attention(q, k, v, bias, layout=layout)
  assert out.shape == (2, 5, 4, 8)
  q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q64, k64) + bias
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum('bhqk,bkhd->bqhd', w, v64), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='attention_layout must be one of'):
    dataclasses.replace(CFG, attention_layout='bhdq')


def test_folded_cross_attention_equals_a_float64_projected_attention():
  heads, head_dim, d = 4, 8, 32
  rng = np.random.default_rng(1)
  q_in = rng.normal(size=(2, 3, d)).astype(np.float32)
  kv_in = rng.normal(size=(2, 50, d)).astype(np.float32)
  mask = rng.random((2, 1, 3, 50)) > 0.2
  assert layers.cross_attention_fold_saves(3, 50, d, heads, head_dim)
  attention = layers.MultiHeadDotProductAttention(heads, head_dim)
  variables = attention.init(jax.random.PRNGKey(2), q_in, kv_in, mask)
  w = {k: np.asarray(v['kernel']) for k, v in variables['params'].items()}
  ref = _numpy_attention(q_in, kv_in, w['query'], w['key'], w['value'], w['out'], heads, mask)
  for fold in (True, False):
    module = layers.MultiHeadDotProductAttention(heads, head_dim, fold_cross_attention=fold)
    out = module.apply(variables, q_in, kv_in, mask)
    _assert_close_rel(out, ref, 2e-6)


def test_fold_is_taken_only_where_it_halves_the_flops():
  # T5 1.1 small cross-attention: d=512, 6 heads of 64, a 228-position encoder (P=100 + 128).
  assert layers.cross_attention_fold_saves(8, 228, 512, 6, 64)
  assert layers.cross_attention_fold_saves(24, 228, 512, 6, 64)
  assert not layers.cross_attention_fold_saves(32, 228, 512, 6, 64)
  assert not layers.cross_attention_fold_saves(228, 228, 512, 6, 64)


def _folds(config, hooks_obj=None):
  """Whether the compiled forward of `config` projects the encoder output with the key kernel."""
  module = t5.EncoderDecoder(config, hooks=hooks_obj)
  variables = module.init(jax.random.PRNGKey(0), ENC, DEC_IN, TGT, enable_dropout=False)
  hlo = (
      jax.jit(lambda p: module.apply(p, ENC, DEC_IN, TGT, enable_dropout=False))
      .lower(variables)
      .compile()
      .as_text()
  )
  projected = re.search(r'encoder_decoder_attention/key[/+]', hlo) is not None
  return not projected, variables


def test_fold_is_skipped_where_a_hook_needs_the_keys():
  assert _folds(CFG)[0]
  assert not _folds(PLAIN)[0]
  # A dense hook on the cross-attention's key kernel needs `x @ key`, an attention hook the keys.
  dense_on_key = toy_methods.LowRankHooks(kernels=('key',), rank=2)
  for method in (dense_on_key, toy_methods.KVScaleHooks(scale=0.5)):
    folds, _ = _folds(CFG, method)
    assert not folds, method


def test_dense_hooks_see_their_own_slice_of_a_fused_product(params):
  """A low-rank update on query and value through the fused matmul equals the merged kernels."""
  method = toy_methods.LowRankHooks(kernels=('query', 'value', 'wi_1'), rank=2, b_scale=0.3)
  module = t5.EncoderDecoder(CFG, hooks=method)
  variables = module.init(jax.random.PRNGKey(3), ENC, DEC_IN, TGT, enable_dropout=False)
  flat = params_lib.flatten_params(variables['params'])
  flat.update(params_lib.flatten_params(params))
  hooked_params = params_lib.unflatten_params(flat)
  hook_paths = sorted(set(flat) - set(params_lib.flatten_params(params)))
  assert 'encoder/layers_0/attention/query/low_rank/b' in hook_paths
  assert 'decoder/layers_1/mlp/wi_1/low_rank/a' in hook_paths
  out = {}
  for fuse in (True, False):
    config = dataclasses.replace(CFG, fuse_kernels=fuse)
    out[fuse] = np.asarray(
        t5.EncoderDecoder(config, hooks=method).apply(
            {'params': hooked_params}, ENC, DEC_IN, TGT, enable_dropout=False
        )
    )
  base = np.asarray(
      t5.EncoderDecoder(PLAIN).apply({'params': params}, ENC, DEC_IN, TGT, enable_dropout=False)
  )
  assert np.abs(out[False] - base).max() > 1e-3  # the hooks change the logits
  _assert_close_rel(out[True], out[False], 1e-6)


def test_head_major_attention_equals_the_standard_layout():
  rng = np.random.default_rng(5)
  q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
  v = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
  bias = layers.masks_lib.mask_to_bias(rng.random((2, 1, 3, 9)) > 0.3, jnp.float32)
  ref = layers.dot_product_attention(q, k, v, bias)
  out = layers.head_major_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), bias)
  _assert_close_rel(out, ref, 1e-6)


def test_single_query_attention_equals_the_standard_layout():
  rng = np.random.default_rng(7)
  q = rng.normal(size=(2, 1, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
  v = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
  bias = layers.masks_lib.mask_to_bias(rng.random((2, 1, 1, 9)) > 0.3, jnp.float32)
  bias = bias + rng.normal(size=(1, 4, 1, 9)).astype(np.float32)
  ref = layers.dot_product_attention(q, k, v, bias)
  _assert_close_rel(layers.single_query_attention(q, k, v, bias), ref, 1e-6)


# ----------------------------------------------------------------------------------- decoding


def _model(config, method=None):
  return models.EncoderDecoderModel(
      t5.EncoderDecoder(config, hooks=method), None, None, decode_fn=decoding.temperature_sample
  )


def _greedy_by_forward(config, params, method, n):
  """Greedy decoding by full forward passes over the growing prefix (no cache at all)."""
  module = t5.EncoderDecoder(config, hooks=method)
  ones = np.ones((B, n), np.int32)  # targets: every position real
  forward = jax.jit(lambda p, d: module.apply({'params': p}, ENC, d, ones, enable_dropout=False))
  dec = np.zeros((B, n), np.int32)
  out = np.zeros((B, n), np.int32)
  for t in range(n):
    logits = np.array(forward(params, dec)[:, t])
    logits[:, 1] = -1e10  # no EOS: every row decodes n tokens
    out[:, t] = logits.argmax(-1)
    if t + 1 < n:
      dec[:, t + 1] = out[:, t]
  return out


def _no_eos(logits, state):
  del state
  return logits.at[:, 1].set(-1e10)


@pytest.mark.parametrize('method_name', ['none', 'prefix', 'scale_kv'])
def test_decode_projects_the_encoder_once_and_equals_full_forward_passes(params, method_name):
  method = {
      'none': None,
      'prefix': toy_methods.PrefixHooks(num_prefix=2, scale=0.5),
      'scale_kv': toy_methods.KVScaleHooks(scale=0.5),
  }[method_name]
  n = 6
  model = _model(CFG, method)
  variables = t5.EncoderDecoder(CFG, hooks=method).init(
      jax.random.PRNGKey(6), ENC, DEC_IN, TGT, enable_dropout=False
  )
  flat = params_lib.flatten_params(variables['params'])
  flat.update(params_lib.flatten_params(params))
  hooked = params_lib.unflatten_params(flat)
  batch = {'encoder_input_tokens': ENC, 'decoder_input_tokens': np.zeros((B, n), np.int32)}

  def predict(p, bt):
    return model.predict_batch_with_aux(
        p, bt, decoder_params={'topk': 1, 'logit_callback_fn': _no_eos}
    )[0]

  fn = jax.jit(predict)
  tokens = np.asarray(fn(hooked, batch))
  np.testing.assert_array_equal(tokens, _greedy_by_forward(CFG, hooked, method, n))

  # The encoder keys and values are made once, outside the decode loop, in the layouts the
  # attention products read: the loop body neither projects nor transposes them.
  hlo = fn.lower(hooked, batch).compile().as_text()
  bodies = re.findall(r'\n(%\S*(?:body|region)\S* .*?\n})', hlo, re.S)
  loop = [b for b in bodies if 'encoder_decoder_attention' in b]
  assert loop, 'no decode loop found'
  body = max(loop, key=len)
  assert not re.search(r'encoder_decoder_attention/(key|value)[/+]', body)
  length = ENC.shape[1] + (2 if method_name == 'prefix' else 0)
  heads, head_dim = CFG.num_heads, CFG.head_dim
  relayouts = [f'[{B},{heads},{head_dim},{length}]', f'[{B},{heads},{length},{head_dim}]']
  if method_name != 'prefix':  # a self-attention prefix is concatenated to the cache every step
    # Nor is the self-attention cache [B, n, heads, head_dim] copied into another layout.
    relayouts += [f'[{B},{heads},{head_dim},{n}]', f'[{B},{heads},{n},{head_dim}]']
  for shape in relayouts:
    assert not re.search(rf'= f32{re.escape(shape)}\S* (transpose|copy|fusion)\(', body), shape


def test_encoded_kv_collection_holds_hooked_keys_and_values(params):
  """What a decode keeps: keys `[B, H, D, L]` and values `[B, H, L, D]`, the hooks applied."""
  method = toy_methods.KVScaleHooks(scale=0.5)
  module = t5.EncoderDecoder(CFG, hooks=method)
  variables = module.init(jax.random.PRNGKey(6), ENC, DEC_IN, TGT, enable_dropout=False)
  flat = params_lib.flatten_params(variables['params'])
  flat.update(params_lib.flatten_params(params))
  hooked = params_lib.unflatten_params(flat)
  encoded = module.apply({'params': hooked}, ENC, enable_dropout=False, method=module.encode)
  cache, kv = _model(CFG, method)._init_decoding(
      hooked, encoded, ENC, np.zeros((B, 4), np.int32), {}
  )
  assert set(kv['decoder']) == {f'layers_{i}' for i in range(CFG.num_decoder_layers)}
  assert 'cached_key' in cache['decoder']['layers_0']['self_attention']
  got = kv['decoder']['layers_1']['encoder_decoder_attention']
  p = hooked['decoder']['layers_1']['encoder_decoder_attention']
  split = lambda x: np.asarray(x).reshape(B, L, CFG.num_heads, CFG.head_dim)
  key = split(np.asarray(encoded) @ np.asarray(p['key']['kernel']))
  value = split(np.asarray(encoded) @ np.asarray(p['value']['kernel']))
  key_scale = np.asarray(p['kv_scale']['key_scale'])[None, None]
  value_scale = np.asarray(p['kv_scale']['value_scale'])[None, None]
  _assert_close_rel(got['key'], (key * key_scale).transpose(0, 2, 3, 1), 1e-6)
  _assert_close_rel(got['value'], (value * value_scale).transpose(0, 2, 1, 3), 1e-6)
