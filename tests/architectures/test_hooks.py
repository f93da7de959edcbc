"""The backbone's doors (`architectures/hooks.py`): one tiny method per door, checked independently.

References are independent of the hook code: a float64 numpy attention with the prefix keys
concatenated by hand; the plain backbone with the hook's effect folded into its weights
(a low-rank update added to a kernel, a rescaling folded into a kernel's columns or rows, a
per-layer shift folded into the embedding); and greedy decoding by full forward passes.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import toy_methods
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import hooks
from prompt_tuning.architectures import layers
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models

CFG = t5.get_config('tiny', vocab_size=40, num_decoder_layers=3)
B, L, T = 3, 7, 5
EOS = 1


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, CFG.vocab_size, size=(B, L)).astype(np.int32)
  enc[1, 5:] = 0
  enc[2, 3:] = 0
  tgt = rng.integers(3, CFG.vocab_size, size=(B, T)).astype(np.int32)
  tgt[2, 3:] = 0
  dec_in = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1) * (tgt > 0)
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': dec_in,
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
  }


BATCH = _batch()


def _init(module, batch=BATCH, **kw):
  return module.init(
      jax.random.PRNGKey(0),
      batch['encoder_input_tokens'],
      batch['decoder_input_tokens'],
      batch['decoder_target_tokens'],
      enable_dropout=False,
      **kw,
  )


def _logits(module, params, batch=BATCH, **kw):
  return np.asarray(
      module.apply(
          {'params': params},
          batch['encoder_input_tokens'],
          batch['decoder_input_tokens'],
          batch['decoder_target_tokens'],
          enable_dropout=False,
          **kw,
      )
  )


@pytest.fixture(scope='module')
def base():
  module = t5.EncoderDecoder(CFG)
  params = _init(module)['params']
  # Larger weights than the default init so every door changes the logits visibly.
  params = jax.tree_util.tree_map(lambda x: x * 2.0 if x.ndim == 2 else x, params)
  return module, params


def _with_base(params, base_params):
  """`params` of a hooked model with the backbone weights replaced by `base_params`."""
  flat = params_lib.flatten_params(params)
  flat.update(params_lib.flatten_params(base_params))
  return params_lib.unflatten_params(flat)


def _hook_paths(params, base_params):
  return sorted(
      set(params_lib.flatten_params(params)) - set(params_lib.flatten_params(base_params))
  )


# -------------------------------------------------------------------------- no hooks at all --


@pytest.mark.parametrize(
    'empty', [hooks.Hooks(), hooks.Compose(()), hooks.Compose((hooks.Hooks(), None))]
)
def test_without_hooks_the_tree_and_logits_are_bit_identical(base, empty):
  module, params = base
  hooked = t5.EncoderDecoder(CFG, hooks=empty)
  variables = _init(hooked)
  assert jax.tree_util.tree_structure(variables['params']) == jax.tree_util.tree_structure(
      _init(module)['params']
  )
  np.testing.assert_array_equal(_logits(hooked, params), _logits(module, params))


# ---------------------------------------------------------------------- layer-input door --


def test_layer_input_hook_params_live_under_their_layer_and_fold_into_the_embedding(base):
  module, params = base
  hooked = t5.EncoderDecoder(CFG, hooks=toy_methods.ShiftHooks(layers=(0,), scale=0.5))
  hook_params = _with_base(_init(hooked)['params'], params)
  assert _hook_paths(hook_params, params) == ['encoder/layers_0/shift/vector']
  v = np.asarray(hook_params['encoder']['layers_0']['shift']['vector'])
  assert np.abs(v).max() > 0.05
  # Adding v to layer 0's input of the encoder == adding v to every row of the embedding table
  # (the encoder's only use of it).
  shifted = jax.tree_util.tree_map(lambda x: x, params)
  shifted['token_embedder'] = {'embedding': params['token_embedder']['embedding'] + v[None]}

  def encode(m, p):
    return np.asarray(
        m.apply(
            {'params': p},
            BATCH['encoder_input_tokens'],
            enable_dropout=False,
            method=m.encode,
        )
    )

  np.testing.assert_allclose(encode(hooked, hook_params), encode(module, shifted), atol=2e-5)
  assert np.abs(encode(hooked, hook_params) - encode(module, params)).max() > 1e-3


def test_layer_input_hook_gradients_reach_its_parameters_and_only_those_are_trainable(base):
  _, params = base
  hooked = t5.EncoderDecoder(CFG, hooks=toy_methods.ShiftHooks(stacks=('encoder', 'decoder')))
  full = _with_base(_init(hooked)['params'], params)
  paths = _hook_paths(full, params)
  assert paths == sorted(
      [f'encoder/layers_{i}/shift/vector' for i in range(2)]
      + [f'decoder/layers_{i}/shift/vector' for i in range(3)]
  )
  is_hook = params_lib.match_any(['.*/shift/.*'])
  trainable = params_lib.unflatten_params(
      {k: v for k, v in params_lib.flatten_params(full).items() if is_hook(k)}
  )
  frozen = params_lib.unflatten_params(
      {k: v for k, v in params_lib.flatten_params(full).items() if not is_hook(k)}
  )

  def loss(tr):
    merged = _with_base(tr, frozen)
    return jnp.sum(_logits_j(hooked, merged) ** 2)

  grads = params_lib.flatten_params(jax.grad(loss)(trainable))
  assert sorted(grads) == paths
  for path, g in grads.items():
    assert np.abs(np.asarray(g)).max() > 0, path


def _logits_j(module, params, batch=BATCH):
  return module.apply(
      {'params': params},
      batch['encoder_input_tokens'],
      batch['decoder_input_tokens'],
      batch['decoder_target_tokens'],
      enable_dropout=False,
  )


def test_layer_input_hook_sees_the_prompt_positions():
  """With a prompt, `ctx.prompt_mask` marks the prompt: a prompt-only shift moves only there."""
  module = prompted.PromptEncoderDecoder(
      CFG, prompt_length=2, hooks=toy_methods.ShiftHooks(layers=(0,), scale=1.0, prompt_only=True)
  )
  params = _init(module)['params']
  v = np.asarray(params['encoder']['layers_0']['shift']['vector'])
  prompt = np.asarray(params['encoder']['prompt']['prompt']['prompt'])
  # Same as shifting the prompt itself by v (the prompt is layer 0's input at its positions).
  moved = jax.tree_util.tree_map(lambda x: x, params)
  moved['encoder']['prompt']['prompt']['prompt'] = prompt + v[None]
  moved['encoder']['layers_0']['shift']['vector'] = np.zeros_like(v)
  np.testing.assert_allclose(_logits(module, params), _logits(module, moved), atol=2e-5)


# --------------------------------------------------------------------- key/value door --


class _PrefixedAttention(nn.Module):
  """One attention with a stack's relative-position bias sized for `P` prefix keys."""

  num_prefix: int
  bidirectional: bool
  block: str

  @nn.compact
  def __call__(self, x, mask):
    site = hooks.Site('encoder' if self.block == 'attention' else 'decoder', 0, self.block)
    h = toy_methods.PrefixHooks(num_prefix=self.num_prefix, num_heads=4, head_dim=8)
    relpos = layers.RelativePositionBiases(32, 128, 4, name='relpos_bias')
    n = self.num_prefix + x.shape[1]
    bias = relpos(n, n, self.bidirectional)
    attention = layers.MultiHeadDotProductAttention(4, 8, hooks=h, site=site, name='attention')
    return attention(x, x, mask, bias, enable_dropout=False, bias_offset=self.num_prefix)


def _np_attention(p, x, mask, bidirectional, num_prefix):
  """float64 numpy T5 attention with the prefix keys/values concatenated by hand."""
  f = lambda a: np.asarray(a, np.float64)
  att = p['attention']
  q = (f(x) @ f(att['query']['kernel'])).reshape(x.shape[0], x.shape[1], 4, 8)
  k = (f(x) @ f(att['key']['kernel'])).reshape(x.shape[0], x.shape[1], 4, 8)
  v = (f(x) @ f(att['value']['kernel'])).reshape(x.shape[0], x.shape[1], 4, 8)
  pk = np.broadcast_to(f(att['prefix']['key'])[None], (x.shape[0],) + att['prefix']['key'].shape)
  pv = np.broadcast_to(f(att['prefix']['value'])[None], pk.shape)
  k = np.concatenate([pk, k], axis=1)
  v = np.concatenate([pv, v], axis=1)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k)
  # Prefix key j sits at position j, token t at num_prefix + t (PEFT's convention).
  qpos = num_prefix + np.arange(x.shape[1])
  kpos = np.arange(num_prefix + x.shape[1])
  buckets = layers.relative_position_bucket(kpos[None, :] - qpos[:, None], bidirectional, 32, 128)
  logits = logits + f(p['relpos_bias']['rel_embedding'])[:, buckets][None]
  full_mask = np.concatenate([np.ones(mask.shape[:-1] + (num_prefix,), bool), mask], axis=-1)
  logits = np.where(full_mask, logits, -1e10)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  o = np.einsum('bhqk,bkhd->bqhd', w, v).reshape(x.shape[0], x.shape[1], 32)
  return o @ f(att['out']['kernel'])


@pytest.mark.parametrize('block,bidirectional', [('attention', True), ('self_attention', False)])
def test_prefix_keys_equal_a_numpy_attention_with_the_vectors_concatenated(block, bidirectional):
  num_prefix = 3
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, 32)).astype(np.float32)
  real = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], bool)
  mask = real[:, None, :, None] & real[:, None, None, :]
  if not bidirectional:
    mask = mask & np.tril(np.ones((6, 6), bool))[None, None]
  module = _PrefixedAttention(num_prefix, bidirectional, block)
  params = module.init(jax.random.PRNGKey(2), x, mask)['params']
  assert params['attention']['prefix']['key'].shape == (num_prefix, 4, 8)
  got = np.asarray(module.apply({'params': params}, x, mask))
  want = _np_attention(params, x, mask, bidirectional, num_prefix)
  rows = real[..., None]
  np.testing.assert_allclose(got * rows, want * rows, rtol=1e-5, atol=1e-5)


def test_prefix_params_live_under_each_attention(base):
  _, params = base
  module = t5.EncoderDecoder(CFG, hooks=toy_methods.PrefixHooks(num_prefix=2))
  paths = _hook_paths(_init(module)['params'], params)
  expected = []
  for i in range(2):
    expected += [f'encoder/layers_{i}/attention/prefix/{n}' for n in ('key', 'value')]
  for i in range(3):
    for blk in ('encoder_decoder_attention', 'self_attention'):
      expected += [f'decoder/layers_{i}/{blk}/prefix/{n}' for n in ('key', 'value')]
  assert paths == sorted(expected)


def test_a_prefix_without_room_in_the_bias_is_an_error():
  class NoRoom(toy_methods.PrefixHooks):

    def prefix_length(self, site):
      return 0

  module = t5.EncoderDecoder(CFG, hooks=NoRoom(num_prefix=2))
  with pytest.raises(ValueError, match='prefix_length'):
    _init(module)


def test_key_value_rescaling_folds_into_the_kernels(base):
  module, params = base
  hooked = t5.EncoderDecoder(CFG, hooks=toy_methods.KVScaleHooks(scale=0.5))
  full = _with_base(_init(hooked)['params'], params)
  folded = params_lib.flatten_params(params)
  for path, value in params_lib.flatten_params(full).items():
    if path.endswith('/kv_scale/key_scale') or path.endswith('/kv_scale/value_scale'):
      kernel = path.replace('kv_scale/key_scale', 'key/kernel').replace(
          'kv_scale/value_scale', 'value/kernel'
      )
      folded[kernel] = folded[kernel] * np.asarray(value).reshape(-1)[None, :]
  folded = params_lib.unflatten_params(folded)
  np.testing.assert_allclose(_logits(hooked, full), _logits(module, folded), rtol=1e-4, atol=1e-4)
  assert np.abs(_logits(hooked, full) - _logits(module, params)).max() > 1e-2


# ------------------------------------------------------------------------------ MLP door --


def test_mlp_rescaling_folds_into_wo(base):
  module, params = base
  hooked = t5.EncoderDecoder(CFG, hooks=toy_methods.MlpScaleHooks(scale=0.5))
  full = _with_base(_init(hooked)['params'], params)
  folded = params_lib.flatten_params(params)
  n = 0
  for path, value in params_lib.flatten_params(full).items():
    if path.endswith('/mlp/mlp_scale/mlp_scale'):
      wo = path.replace('mlp_scale/mlp_scale', 'wo/kernel')
      folded[wo] = folded[wo] * np.asarray(value)[:, None]
      n += 1
  assert n == CFG.num_encoder_layers + CFG.num_decoder_layers
  folded = params_lib.unflatten_params(folded)
  np.testing.assert_allclose(_logits(hooked, full), _logits(module, folded), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- dense door --


def test_dense_hook_with_zero_update_is_bit_identical(base):
  module, params = base
  kernels = ('query', 'key', 'value', 'out', 'wi_0', 'wi_1', 'wo', 'logits_dense')
  hooked = t5.EncoderDecoder(CFG, hooks=toy_methods.LowRankHooks(kernels=kernels))
  full = _with_base(_init(hooked)['params'], params)
  assert 'decoder/logits_dense/low_rank/b' in params_lib.flatten_params(full)
  assert 'encoder/layers_1/attention/query/low_rank/a' in params_lib.flatten_params(full)
  np.testing.assert_array_equal(_logits(hooked, full), _logits(module, params))


def test_dense_low_rank_update_equals_the_merged_kernel(base):
  module, params = base
  hooked = t5.EncoderDecoder(CFG, hooks=toy_methods.LowRankHooks(b_scale=0.3))
  full = _with_base(_init(hooked)['params'], params)
  flat = params_lib.flatten_params(full)
  merged = params_lib.flatten_params(params)
  count = 0
  for path in flat:
    if path.endswith('/low_rank/a'):
      kernel = path.replace('low_rank/a', 'kernel')
      b = flat[path[: -len('/a')] + '/b']
      merged[kernel] = merged[kernel] + np.asarray(flat[path]) @ np.asarray(b)
      count += 1
  # query and value of 2 encoder self-, 3 decoder self- and 3 cross-attentions.
  assert count == 2 * (2 + 3 + 3)
  merged = params_lib.unflatten_params(merged)
  np.testing.assert_allclose(_logits(hooked, full), _logits(module, merged), rtol=1e-4, atol=1e-4)
  assert np.abs(_logits(hooked, full) - _logits(module, params)).max() > 1e-2


# -------------------------------------------------------------------- per-example features --


def test_features_reach_a_prompt_module_per_example():
  module = t5.EncoderDecoder(CFG, prompt_factory=toy_methods.task_prompt_factory(3, 2))
  task_ids = np.array([2, 0, 1], np.int32)
  params = _init(module, features={'task_ids': task_ids})['params']
  mixed = _logits(module, params, features={'task_ids': task_ids})
  for b in range(B):
    one = {k: v[b : b + 1] for k, v in BATCH.items()}
    alone = _logits(module, params, one, features={'task_ids': task_ids[b : b + 1]})
    np.testing.assert_allclose(mixed[b : b + 1], alone, rtol=1e-5, atol=1e-5)
  other = _logits(module, params, features={'task_ids': np.array([1, 1, 1], np.int32)})
  assert np.abs(other - mixed).max() > 1e-3


# --------------------------------------------------------------- cached = uncached decoding --


def _never_pad(logits, state):
  """Token 0 is both padding and BOS in T5: a generated 0 would read as padding (as in T5X)."""
  del state
  return logits.at[:, 0].set(-1e10)


def _greedy_without_cache(forward, params, batch, length):
  enc = batch['encoder_input_tokens']
  out = np.zeros((enc.shape[0], length), np.int32)
  done = np.zeros(enc.shape[0], bool)
  for t in range(length):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], axis=1)
    logits = forward(
        params,
        dict(
            batch,
            decoder_input_tokens=dec_in,
            decoder_target_tokens=np.ones_like(out),
        ),
    )
    token = np.asarray(jnp.argmax(logits[:, t, 1:], axis=-1)) + 1  # never 0, see `_never_pad`
    out[:, t] = np.where(done, 0, token)
    done |= token == EOS
  return out


@pytest.mark.parametrize(
    'name,hooks_obj',
    [
        ('all doors', toy_methods.all_doors()),
        ('prefix', toy_methods.PrefixHooks(num_prefix=3)),
        ('shared', toy_methods.SharedShiftHooks(width=CFG.emb_dim)),
    ],
)
def test_cached_decoding_equals_uncached_with_the_doors_in_use(name, hooks_obj):
  module = prompted.PromptEncoderDecoder(CFG, prompt_length=2, hooks=hooks_obj, num_prompts=2)
  batch = dict(BATCH, prompt_ids=np.array([0, 1, 1], np.int32))
  model = models.EncoderDecoderModel(module, None, None, decode_fn=decoding.temperature_sample)
  shapes = {k: v.shape for k, v in batch.items()}
  params = model.get_initial_variables(jax.random.PRNGKey(5), shapes)['params']
  params = jax.tree_util.tree_map(lambda x: x * 2.5 if x.ndim == 2 else x, params)
  greedy = jax.jit(
      functools.partial(
          model.predict_batch_with_aux,
          decoder_params={'topk': 1, 'logit_callback_fn': _never_pad},
      )
  )
  forward = jax.jit(model._compute_logits)  # pylint: disable=protected-access
  decodes = np.asarray(greedy(params, batch)[0])
  expected = _greedy_without_cache(forward, params, batch, T)
  np.testing.assert_array_equal(decodes, expected, err_msg=name)
  assert len(set(expected.ravel().tolist())) >= 3, 'degenerate decodes make a weak test'


# ---------------------------------------------------------------------- shared-hook door --


def test_a_shared_module_is_built_once_and_every_hook_reads_its_value(base):
  """One model-level vector added at every layer equals per-layer vectors all set to it."""
  module, params = base
  shared = t5.EncoderDecoder(CFG, hooks=toy_methods.SharedShiftHooks(width=CFG.emb_dim))
  shared_params = _with_base(_init(shared)['params'], params)
  assert _hook_paths(shared_params, params) == ['shared_shift/vector']
  v = np.asarray(shared_params['shared_shift']['vector'])
  per_layer = t5.EncoderDecoder(
      CFG, hooks=toy_methods.ShiftHooks(stacks=('encoder', 'decoder'), scale=0.5)
  )
  flat = params_lib.flatten_params(_with_base(_init(per_layer)['params'], params))
  layer_paths = [p for p in flat if p.endswith('/shift/vector')]
  assert len(layer_paths) == CFG.num_encoder_layers + CFG.num_decoder_layers
  for p in layer_paths:
    flat[p] = v
  per_layer_params = params_lib.unflatten_params(flat)
  np.testing.assert_allclose(
      _logits(shared, shared_params), _logits(per_layer, per_layer_params), rtol=1e-5, atol=1e-5
  )
  assert np.abs(_logits(shared, shared_params) - _logits(module, params)).max() > 1e-3

  def loss(m, p):
    return jnp.sum(_logits_j(m, p) ** 2) * 1e-3

  g_shared = jax.grad(lambda p: loss(shared, p))(shared_params)['shared_shift']['vector']
  g_layers = params_lib.flatten_params(jax.grad(lambda p: loss(per_layer, p))(per_layer_params))
  np.testing.assert_allclose(
      np.asarray(g_shared),
      sum(np.asarray(g_layers[p]) for p in layer_paths),
      rtol=1e-4,
      atol=1e-6,
  )


class _Unnamed(hooks.Hooks):

  def shared(self):
    return toy_methods.SharedVector(4)


def test_shared_modules_need_distinct_names():
  twice = hooks.Compose(
      (
          toy_methods.SharedShiftHooks(width=CFG.emb_dim),
          toy_methods.SharedShiftHooks(width=CFG.emb_dim),
      )
  )
  with pytest.raises(flax.errors.NameInUseError, match='shared_shift'):
    _init(t5.EncoderDecoder(CFG, hooks=twice))
  with pytest.raises(ValueError, match='distinct explicit names'):
    hooks.build_shared(_Unnamed())


# ------------------------------------------------------------------------------ contracts --


def test_site_paths_and_validation():
  assert hooks.Site('encoder', 3, 'attention', 'query').path == 'encoder/layers_3/attention/query'
  assert hooks.Site('decoder', -1, 'logits', 'logits_dense').path == 'decoder/logits_dense'
  assert hooks.Site('decoder', 0, 'layer').path == 'decoder/layers_0'
  with pytest.raises(ValueError, match='stack'):
    hooks.Site('middle', 0, 'layer')
  with pytest.raises(ValueError, match='block'):
    hooks.Site('encoder', 0, 'ffn')
  with pytest.raises(TypeError, match='flax Module'):
    hooks.as_modules([lambda x: x])
  composed = hooks.Compose((toy_methods.PrefixHooks(num_prefix=2), toy_methods.PrefixHooks(4)))
  assert composed.prefix_length(hooks.Site('decoder', 0, 'self_attention')) == 6
