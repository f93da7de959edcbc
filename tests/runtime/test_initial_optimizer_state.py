"""Optimizer state from INITIAL_CHECKPOINT_PATH: T5X's Adafactor statistics continue, as in T5X.

Model tuning that starts from a T5X checkpoint at step s continues Adafactor at step s (its second-moment
decay is then close to 1), so starting from zero statistics instead of the checkpoint's would make the
first updates of a fine-tuning run behave very differently from T5X's.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import runtime_testlib as rt
from prompt_tuning.checkpoints import t5x_format
from prompt_tuning.runtime import adafactor
from prompt_tuning.runtime import checkpoints
from prompt_tuning.runtime import train_state


def _trained_state(opt, params, steps=2):
  state = opt.init_state(params)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    params, state = opt.apply_gradient(
        opt.hyper_params.replace(learning_rate=0.01), params, state, grads
    )
  return state


def test_slots_of_the_checkpoint_fill_the_fresh_state(tmp_path):
  params = jax.tree_util.tree_map(jnp.asarray, rt.tiny_backbone_params())
  opt = adafactor.Adafactor(decay_rate=0.8, beta1=0.9)
  saved = _trained_state(opt, params)
  tree = serialization.to_state_dict(saved.param_states)
  # Another shape for one parameter's second moment in the checkpoint (e.g. factored there, not
  # here): that slot must stay fresh. (The tiny dims are below Adafactor's factoring threshold.)
  assert np.shape(tree['token_embedder']['embedding']['v']) == (128, 32)
  tree['token_embedder']['embedding']['v'] = np.ones((3,), np.float32)
  ckpt = t5x_format.save(
      str(tmp_path / 'checkpoint_2'), params, 2, optimizer_state={'param_states': tree}
  )

  fresh = opt.init_state(params)
  state, restored, kept = checkpoints.load_initial_optimizer_state(
      ckpt, fresh, assignment_map=((r'decoder/logits_dense/kernel', None),)
  )
  flat_saved = train_state.flatten(serialization.to_state_dict(saved.param_states))
  flat_fresh = train_state.flatten(serialization.to_state_dict(fresh.param_states))
  flat_out = train_state.flatten(serialization.to_state_dict(state.param_states))
  assert 'token_embedder/embedding/v' in kept
  assert 'token_embedder/embedding/m' in restored
  assert {'decoder/logits_dense/kernel/v', 'decoder/logits_dense/kernel/m'} <= set(kept)
  assert 'encoder/layers_0/mlp/wi_0/kernel/m' in restored  # momentum slots too
  assert len(restored) > 20
  for name, value in flat_out.items():
    expected = flat_saved[name] if name in restored else flat_fresh[name]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=name)
    if name in restored and np.shape(value) != (1,):
      assert np.abs(np.asarray(value)).max() > 0  # a real statistic, not the fresh zeros
  # Unused slots (shape (1,)) are neither restored nor reported.
  assert not any(np.shape(flat_out[n]) == (1,) for n in restored + kept)


def test_checkpoints_without_optimizer_state_leave_it_fresh(tmp_path):
  params = jax.tree_util.tree_map(jnp.asarray, rt.tiny_backbone_params())
  opt = adafactor.Adafactor(decay_rate=0.8)
  ckpt = t5x_format.save(str(tmp_path / 'checkpoint_0'), params, 0)  # params only
  fresh = opt.init_state(params)
  state, restored, kept = checkpoints.load_initial_optimizer_state(ckpt, fresh)
  assert restored == [] and len(kept) > 20
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_model_tuning_continues_the_adafactor_statistics_of_a_t5x_checkpoint(
    tmp_path, tmp_path_factory
):
  """Run A writes the gin-configured optimizer's state (its factorization); it goes into a T5X checkpoint
  with second moments scaled far above what one step adds; run B starts from that checkpoint. After one
  step B's statistics are about decay * the checkpoint's (decay = 1 - 1002^-0.8 = 0.996); from fresh
  zeros they would be about 1e-4 of them."""
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  init = rt.make_t5x_checkpoint(str(tmp_path / 'init'), step=1000)

  def train(model_dir, init_ckpt, steps):
    bindings = rt.model_tuning_bindings(
        model_dir,
        steps=steps,
        extra={
            'INITIAL_CHECKPOINT_PATH': rt.q(init_ckpt),
            'utils.SaveCheckpointConfig.period': '1',
            # The checkpoint's size (a checkpoint of another size is refused).
            'NUM_ENCODER_LAYERS': '2',
            'NUM_DECODER_LAYERS': '2',
        },
    )
    proc = rt.run(rt.entry_args('prompt_tuning.train', rt.MODEL_TUNING_GIN, bindings), env)
    rt.check_ok(proc, f'training {model_dir}')
    return checkpoints.restore_checkpoint(os.path.join(model_dir, f'checkpoint_{steps}'))

  raw_a = train(str(tmp_path / 'a'), init, 1001)
  states = raw_a['opt_state']['param_states']
  scaled = jax.tree_util.tree_map(lambda x: np.asarray(x) * 1e4 + 1.0, states)
  t5x_ckpt = t5x_format.save(
      str(tmp_path / 't5x' / 'checkpoint_1001'),
      raw_a['trainable'],
      1001,
      optimizer_state={'param_states': scaled},
  )

  raw_b = train(str(tmp_path / 'b'), t5x_ckpt, 1002)
  before = train_state.flatten(scaled)
  after = train_state.flatten(raw_b['opt_state']['param_states'])
  second_moments = [
      n
      for n in before
      if n.rsplit('/', 1)[1] in ('v_row', 'v_col', 'v') and np.shape(before[n]) != (1,)
  ]
  assert len(second_moments) > 10
  for name in second_moments:
    ratio = np.asarray(after[name]) / before[name]
    # decay * old + (1 - decay) * (this step's squared gradient): at least the decayed checkpoint value.
    assert 0.99 < ratio.min() and ratio.max() < 1.5, (name, ratio.min(), ratio.max())
    assert abs(np.median(ratio) - 0.996) < 2e-3, (name, np.median(ratio))
