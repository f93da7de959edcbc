"""The runtime's train step as pure functions (`trainer.train_with_lr`), tested without a Trainer.

* FLOPs (XLA cost analysis) of the real jitted step: prompt tuning costs about two forward passes
  (no backbone weight gradients), model tuning about three.
* Only the trainable parameters change: the prompt, or a method's hook parameters.
* Metrics with their own reductions: over 4 microbatches every metric equals the unmicrobatched
  step's (ratios are ratios of sums, not means of ratios), and the gradients agree.
* Extra loss terms (the runtime's loss door) add to the loss and show up as their own metrics.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_methods
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import adafactor
from prompt_tuning.runtime import metrics as metrics_lib
from prompt_tuning.runtime import models
from prompt_tuning.runtime import optimizers
from prompt_tuning.runtime import train_state as train_state_lib
from prompt_tuning.runtime import trainer

B, L, T, P = 8, 32, 8, 8
CFG = t5.get_config('tiny', emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128, vocab_size=64)


def _batch():
  rng = np.random.RandomState(0)
  enc = rng.randint(2, CFG.vocab_size, size=(B, L)).astype(np.int32)
  enc[:, L - 5 :] = 0
  tgt = rng.randint(2, CFG.vocab_size, size=(B, T)).astype(np.int32)
  # Microbatches of 2 examples with very different numbers of real target tokens, so a mean of
  # per-microbatch ratios differs from the ratio over the whole batch.
  for i, n in enumerate([8, 8, 1, 1, 5, 2, 8, 3]):
    tgt[i, n:] = 0
  dec_in = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1) * (tgt > 0)
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': dec_in,
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
  }


BATCH = _batch()


def _model(regexes, module=None, **kw):
  opt = optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any(regexes)),
              adafactor.Adafactor(decay_rate=0.8, multiply_by_parameter_scale=False),
          ),
      )
  )
  module = module or prompted.PromptEncoderDecoder(CFG, prompt_length=P)
  return models.EncoderDecoderModel(module, None, None, optimizer_def=opt, **kw)


def _state(model, seed=0):
  shapes = {k: v.shape for k, v in BATCH.items()}
  params = model.get_initial_variables(jax.random.PRNGKey(seed), shapes)['params']
  trainable, frozen = train_state_lib.split_params(params, model.optimizer_def.trainable_filter)
  return train_state_lib.TrainState(
      step=jnp.asarray(0, jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=model.optimizer_def.init_state(trainable),
  )


def _step(model, num_microbatches=None, lr=0.3):
  return jax.jit(
      functools.partial(
          trainer.train_with_lr,
          learning_rate=lr,
          dropout_rng=None,
          model=model,
          num_microbatches=num_microbatches,
      )
  )


def _flops(fn, *args):
  cost = fn.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def test_prompt_step_costs_about_two_forwards_and_model_tuning_three():
  prompt_model = _model(['.*/prompt/.*'])
  full_model = _model(['.*'])
  prompt_state, full_state = _state(prompt_model), _state(full_model)
  forward = _flops(
      jax.jit(lambda p, b: prompt_model.loss_fn(p, b, None)[0]), prompt_state.params, BATCH
  )
  prompt_step = _flops(_step(prompt_model), prompt_state, BATCH)
  full_step = _flops(_step(full_model), full_state, BATCH)
  prompt_ratio, full_ratio = prompt_step / forward, full_step / forward
  print(f'forward {forward:.3g}; prompt step {prompt_ratio:.2f}x; full step {full_ratio:.2f}x')
  # Forward + backward to the prompt (activations only; the optimizer on P*H is negligible).
  assert prompt_ratio <= 2.3
  # Forward + activation gradients + weight gradients, plus Adafactor over every weight.
  assert 2.5 <= full_ratio <= 3.8
  assert prompt_step / full_step < 0.8


def test_the_step_changes_only_the_trainable_parameters():
  model = _model(['.*/prompt/.*'])
  state = _state(model)
  new_state, metrics = _step(model)(state, BATCH)
  assert int(new_state.step) == 1
  old = params_lib.flatten_params(state.params)
  new = params_lib.flatten_params(new_state.params)
  assert new.keys() == old.keys()
  for path, value in old.items():
    if path == 'encoder/prompt/prompt/prompt':
      assert not np.array_equal(np.asarray(new[path]), np.asarray(value))
    else:
      np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(value), err_msg=path)
  assert np.isfinite(float(metrics['loss']))
  assert float(metrics['learning_rate']) == pytest.approx(0.3)


def test_a_hook_method_trains_only_its_own_parameters():
  module = t5.EncoderDecoder(CFG, hooks=toy_methods.ShiftHooks(stacks=('encoder', 'decoder')))
  model = _model(['.*/shift/.*'], module=module)
  state = _state(model)
  assert sorted(params_lib.flatten_params(state.trainable)) == sorted(
      [f'encoder/layers_{i}/shift/vector' for i in range(2)]
      + [f'decoder/layers_{i}/shift/vector' for i in range(2)]
  )
  grads, _ = jax.jit(
      functools.partial(trainer.accumulate_grads_microbatched, model, dropout_rng=None)
  )(state, BATCH)
  assert (
      params_lib.flatten_params(grads).keys() == params_lib.flatten_params(state.trainable).keys()
  )
  for path, g in params_lib.flatten_params(grads).items():
    assert np.abs(np.asarray(g)).max() > 0, path
  new_state, _ = _step(model)(state, BATCH)
  for path, value in params_lib.flatten_params(state.frozen).items():
    np.testing.assert_array_equal(
        np.asarray(params_lib.flatten_params(new_state.frozen)[path]), np.asarray(value)
    )
  moved = [
      p
      for p, v in params_lib.flatten_params(new_state.trainable).items()
      if not np.array_equal(
          np.asarray(v), np.asarray(params_lib.flatten_params(state.trainable)[p])
      )
  ]
  assert len(moved) == 4


def _largest_logit(params, batch, outputs):
  """A loss term with a Max metric (the reduction must be max over microbatches)."""
  del params, batch
  return 0.0, {'largest_logit': metrics_lib.Max.from_value(jnp.max(outputs['logits']))}


_largest_logit.name = 'watch'


def test_ratio_metrics_and_gradients_over_4_microbatches_equal_the_whole_batch():
  model = _model(['.*/prompt/.*'], loss_terms=(_largest_logit,))
  state = _state(model)
  whole_state, whole = _step(model)(state, BATCH)
  micro_state, micro = _step(model, num_microbatches=4)(state, BATCH)
  whole, micro = metrics_lib.compute(whole), metrics_lib.compute(micro)
  assert whole.keys() == micro.keys()
  for name in whole:
    np.testing.assert_allclose(micro[name], whole[name], rtol=2e-5, err_msg=name)
  # The test can fail: the mean of the per-microbatch ratios is not the whole batch's ratio.
  name = 'loss_per_nonpadding_target_token'
  per_mb = []
  for i in range(4):
    mb = {k: v[2 * i : 2 * i + 2] for k, v in BATCH.items()}
    per_mb.append(float(model.loss_fn(state.params, mb, None)[1][name]))
  assert abs(np.mean(per_mb) - whole[name]) > 100 * 2e-5 * whole[name]
  np.testing.assert_allclose(
      np.asarray(micro_state.trainable['encoder']['prompt']['prompt']['prompt']),
      np.asarray(whole_state.trainable['encoder']['prompt']['prompt']['prompt']),
      rtol=1e-5,
      atol=1e-6,
  )
  # Sums stay sums.
  assert micro['num_examples'] == B and micro['num_tokens'] == BATCH['decoder_loss_weights'].sum()


def test_an_extra_loss_term_adds_to_the_loss_and_reports_its_own_metric():
  def prompt_norm(params, batch, outputs):
    del batch, outputs
    sq = jnp.sum(params['encoder']['prompt']['prompt']['prompt'] ** 2)
    return 0.01 * sq, {'squared_norm': sq}

  plain, with_term = _model(['.*/prompt/.*']), _model(['.*/prompt/.*'], loss_terms=(prompt_norm,))
  state = _state(plain)
  params = state.params
  base_loss, _ = plain.loss_fn(params, BATCH, None)
  loss, metrics = with_term.loss_fn(params, BATCH, None)
  sq = float(np.sum(np.asarray(params['encoder']['prompt']['prompt']['prompt'], np.float64) ** 2))
  np.testing.assert_allclose(float(loss), float(base_loss) + 0.01 * sq, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_terms/prompt_norm']), 0.01 * sq, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['prompt_norm/squared_norm']), sq, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=1e-6)
  # The term's gradient reaches the prompt through the real step.
  g_plain, _ = trainer.accumulate_grads_microbatched(plain, state, BATCH, None)
  g_term, _ = trainer.accumulate_grads_microbatched(with_term, state, BATCH, None)
  prompt = np.asarray(params['encoder']['prompt']['prompt']['prompt'])
  np.testing.assert_allclose(
      np.asarray(g_term['encoder']['prompt']['prompt']['prompt'])
      - np.asarray(g_plain['encoder']['prompt']['prompt']['prompt']),
      0.02 * prompt,
      rtol=1e-3,
      atol=1e-5,
  )


def test_loss_terms_need_scalar_values_and_distinct_names():
  def bad(params, batch, outputs):
    del params, batch
    return outputs['logits'][:, 0, 0], {}

  model = _model(['.*/prompt/.*'], loss_terms=(bad,))
  state = _state(model)
  with pytest.raises(ValueError, match="Loss term 'bad' must return a scalar"):
    model.loss_fn(state.params, BATCH, None)
  with pytest.raises(ValueError, match='distinct names'):
    _model(['.*/prompt/.*'], loss_terms=(bad, bad))
