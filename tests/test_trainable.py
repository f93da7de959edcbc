"""Tests for prompt_tuning.trainable: partitioning and prompt-only gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_tuning import trainable
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5

TREE = {
    'token_embedder': {'embedding': np.ones((4, 2))},
    'encoder': {
        'prompt': {'prompt': {'prompt': np.zeros((3, 2))}},
        'layers_0': {'attention': {'query': {'kernel': np.ones((2, 2))}}},
    },
    'decoder': {'logits_dense': {'kernel': np.ones((2, 4))}},
}


def test_flatten_roundtrip():
  flat = trainable.flatten_params(TREE)
  assert 'encoder/prompt/prompt/prompt' in flat
  assert 'encoder/layers_0/attention/query/kernel' in flat
  back = trainable.unflatten_params(flat)
  assert trainable.flatten_params(back).keys() == flat.keys()


def test_partition_default_prompt_regex():
  train, frozen = trainable.partition_params(TREE)
  assert trainable.flatten_params(train).keys() == {'encoder/prompt/prompt/prompt'}
  assert 'encoder/prompt/prompt/prompt' not in trainable.flatten_params(frozen)
  assert 'prompt' not in frozen['encoder']  # Only leaves; no empty sub-dicts.
  assert len(trainable.flatten_params(frozen)) == 3
  merged = trainable.merge_params(train, frozen)
  assert trainable.flatten_params(merged).keys() == trainable.flatten_params(TREE).keys()


def test_partition_regex_styles():
  # Written without the leading slash.
  train, _ = trainable.partition_params(TREE, ['encoder/prompt/.*'])
  assert list(trainable.flatten_params(train)) == ['encoder/prompt/prompt/prompt']
  # ModelParamTraversal style (leading slash).
  train, _ = trainable.partition_params(TREE, '/decoder/.*')
  assert list(trainable.flatten_params(train)) == ['decoder/logits_dense/kernel']
  # Model tuning.
  train, frozen = trainable.partition_params(TREE, ('.*',))
  assert len(trainable.flatten_params(train)) == 4 and not frozen
  # Several regexes: union.
  train, _ = trainable.partition_params(TREE, ['.*/prompt/.*', 'token_embedder/.*'])
  assert len(trainable.flatten_params(train)) == 2


def test_partition_unmatched_regex_is_an_error():
  with pytest.raises(ValueError, match=r"'\.\*/adapter/\.\*' matches no parameter.*encoder/"):
    trainable.partition_params(TREE, ['.*/prompt/.*', '.*/adapter/.*'])
  train, _ = trainable.partition_params(TREE, '.*/adapter/.*', allow_unmatched=True)
  assert not train


def test_merge_rejects_overlap():
  with pytest.raises(ValueError, match='both'):
    trainable.merge_params({'a': {'b': 1}}, {'a': {'b': 2}})


def test_match_any():
  fn = trainable.match_any(['.*/prompt/.*'])
  assert fn('encoder/prompt/prompt/prompt') and fn('/encoder/prompt/prompt/prompt', None)
  assert not fn('encoder/layers_0/attention/query/kernel')


def test_value_and_grad_trainable_small():
  params = {'w': jnp.array([1.0, 2.0]), 'prompt': {'p': jnp.array([3.0])}}
  train, frozen = trainable.partition_params(params, 'prompt/.*')

  def loss_fn(p, x):
    return jnp.sum(p['w'] * x) * p['prompt']['p'][0], {'aux': 1}

  (loss, aux), grads = trainable.value_and_grad_trainable(loss_fn, has_aux=True)(
      train, frozen, jnp.array([1.0, 1.0])
  )
  assert float(loss) == 9.0 and aux == {'aux': 1}
  assert trainable.flatten_params(grads).keys() == {'prompt/p'}
  np.testing.assert_allclose(np.asarray(grads['prompt']['p']), [3.0])


# ----------------------------------------------------------- prompted model, flops and SGD --

B, L, T, P = 4, 32, 8, 8
CFG = t5.get_config(
    'tiny',
    emb_dim=64,
    num_heads=4,
    head_dim=16,
    mlp_dim=128,
    num_encoder_layers=2,
    num_decoder_layers=2,
)


def _batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CFG.vocab_size, size=(B, L)).astype(np.int32)
  enc[:, L - 5 :] = 0
  tgt = rng.randint(2, CFG.vocab_size, size=(B, T)).astype(np.int32)
  tgt[1, T - 2 :] = 0
  dec_in = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1) * (tgt > 0)
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': dec_in,
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
  }


@pytest.fixture(scope='module')
def setup():
  model = prompted.PromptEncoderDecoder(CFG, prompt_length=P)
  batch = _batch()
  params = jax.jit(
      lambda r: model.init(
          r,
          batch['encoder_input_tokens'],
          batch['decoder_input_tokens'],
          batch['decoder_target_tokens'],
          enable_dropout=False,
      )
  )(jax.random.PRNGKey(0))['params']

  def loss_fn(params, batch):
    logits = model.apply(
        {'params': params},
        batch['encoder_input_tokens'],
        batch['decoder_input_tokens'],
        batch['decoder_target_tokens'],
        enable_dropout=False,
    )
    ce = -jnp.take_along_axis(
        jax.nn.log_softmax(logits), batch['decoder_target_tokens'][..., None], -1
    )[..., 0]
    weights = batch['decoder_loss_weights']
    return jnp.sum(ce * weights) / jnp.sum(weights)

  return params, batch, loss_fn


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def test_prompt_only_gradient_costs_about_two_forwards(setup):
  params, batch, loss_fn = setup
  train, frozen = trainable.partition_params(params)
  forward = _flops(loss_fn, params, batch)
  prompt_step = _flops(trainable.value_and_grad_trainable(loss_fn), train, frozen, batch)
  full_step = _flops(jax.value_and_grad(loss_fn), params, batch)
  prompt_ratio, full_ratio = prompt_step / forward, full_step / forward
  print(
      f'forward {forward:.3g} flops; prompt-only step {prompt_ratio:.2f}x; '
      f'full step {full_ratio:.2f}x'
  )
  assert prompt_ratio <= 2.3
  assert 2.5 <= full_ratio <= 3.6
  assert prompt_step / full_step < 0.85


def _sgd_step(loss_fn, train, frozen, batch, lr=0.1):
  opt = optax.sgd(lr)
  state = opt.init(train)
  _, grads = trainable.value_and_grad_trainable(loss_fn)(train, frozen, batch)
  updates, _ = opt.update(grads, state, train)
  return optax.apply_updates(train, updates)


def test_sgd_step_changes_only_the_prompt(setup):
  params, batch, loss_fn = setup
  train, frozen = trainable.partition_params(params)
  new_train = jax.jit(functools.partial(_sgd_step, loss_fn))(train, frozen, batch)
  new = trainable.flatten_params(trainable.merge_params(new_train, frozen))
  old = trainable.flatten_params(params)
  assert new.keys() == old.keys()
  for path, value in old.items():
    if path == 'encoder/prompt/prompt/prompt':
      assert not np.array_equal(np.asarray(new[path]), np.asarray(value))
    else:
      np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(value), err_msg=path)


def test_model_tuning_changes_every_parameter(setup):
  params, batch, loss_fn = setup
  train, frozen = trainable.partition_params(params, ('.*',))
  assert not frozen
  new_train = jax.jit(functools.partial(_sgd_step, loss_fn))(train, frozen, batch)
  new = trainable.flatten_params(new_train)
  for path, value in trainable.flatten_params(params).items():
    assert not np.array_equal(np.asarray(new[path]), np.asarray(value)), path
