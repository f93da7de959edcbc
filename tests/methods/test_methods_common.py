"""What every method must do in the runtime, checked for each on a tiny T5 with its parameters moved
away from their no-op values:

* one real train step (`trainer.train_with_lr`, Adafactor over the method's regex) leaves every
  backbone parameter bit-identical and moves the method's parameters, which are all the step
  trains (the gradient is taken with respect to them only);
* XLA's cost analysis of that step: about two forward passes (forward + backward through the
  activations; no backbone weight gradients, which would make it about three as model tuning),
  plus the method's own small terms;
* greedy decoding with the KV cache (T5X's `temperature_sample`, top-1) equals greedy decoding by
  full forward passes without a cache.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods_testlib as lib
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.methods import dept
from prompt_tuning.methods import ia3
from prompt_tuning.methods import lora
from prompt_tuning.methods import p_tuning
from prompt_tuning.methods import per_layer
from prompt_tuning.methods import prefix
from prompt_tuning.methods import residual
from prompt_tuning.methods import wayward
from prompt_tuning.runtime import adafactor
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models
from prompt_tuning.runtime import optimizers
from prompt_tuning.runtime import train_state as train_state_lib
from prompt_tuning.runtime import trainer

pytestmark = pytest.mark.slow  # ten methods, each compiling a train step and a decoding loop

B, L, T, P = 4, 12, 6, 3
CFG = lib.tiny_config(num_encoder_layers=1, num_decoder_layers=1)
EOS = 1
HEADS = dict(num_heads=CFG.num_heads, head_dim=CFG.head_dim)


class _Vocab:
  """A vocabulary stand-in for the wayward term (its text is three fixed pieces)."""

  eos_id = EOS

  def encode(self, text):
    del text
    return [5, 6, 7]


def _prompted(factory=None, hooks=None):
  if factory is not None:
    return prompted.PromptEncoderDecoder(CFG, prompt_factory=factory, hooks=hooks)
  return prompted.PromptEncoderDecoder(CFG, prompt_length=P, hooks=hooks)


# name: (module, trainable regexes, loss terms)
METHODS = {
    'p_tuning_mlp': lambda: (_prompted(p_tuning.prompt_factory(P, 'mlp', 16)), ['.*/prompt/.*']),
    'p_tuning_lstm': lambda: (_prompted(p_tuning.prompt_factory(P, 'lstm', 8)), ['.*/prompt/.*']),
    'prefix': lambda: (
        t5.EncoderDecoder(CFG, hooks=prefix.PrefixHooks(num_prefix=2, **HEADS)),
        ['.*prefix.*'],
    ),
    'prefix_projected': lambda: (
        t5.EncoderDecoder(
            CFG,
            hooks=prefix.PrefixHooks(num_prefix=2, projection=True, projection_hidden=8, **HEADS),
        ),
        ['.*prefix.*'],
    ),
    'per_layer': lambda: (
        _prompted(hooks=per_layer.PerLayerPromptHooks(length=P, mode='add')),
        ['.*/prompt/.*'],
    ),
    'residual': lambda: (_prompted(residual.prompt_factory(P, bottleneck=8)), ['.*/prompt/.*']),
    'dept': lambda: (
        _prompted(dept.prompt_factory(P, max_length=L, rank=2)),
        ['.*/prompt/.*'],
    ),
    'ia3': lambda: (t5.EncoderDecoder(CFG, hooks=ia3.IA3Hooks()), ['.*/ia3_scaling.*']),
    'lora': lambda: (t5.EncoderDecoder(CFG, hooks=lora.LoraHooks(rank=2)), ['.*/lora/.*']),
    'wayward': lambda: (_prompted(), ['.*/prompt/.*']),
}


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  enc = rng.randint(3, CFG.vocab_size, size=(B, L)).astype(np.int32)
  enc[1, 7:] = 0
  enc[3, 4:] = 0
  tgt = rng.randint(3, CFG.vocab_size, size=(B, T)).astype(np.int32)
  tgt[2, 3:] = 0
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': lib.decoder_inputs(tgt).astype(np.int32) * (tgt > 0),
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
  }


BATCH = _batch()


def _model(name):
  module, regexes = METHODS[name]()
  terms = ()
  if name == 'wayward':
    table = np.random.RandomState(3).normal(size=(CFG.vocab_size, CFG.emb_dim)).astype(np.float32)
    terms = (wayward.WaywardLoss(table, _Vocab(), 'x', prompt_length=P, gamma=0.1),)
  opt = optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any(regexes)),
              adafactor.Adafactor(
                  decay_rate=0.8,
                  multiply_by_parameter_scale=False,
                  logical_factor_rules=adafactor.standard_logical_factor_rules(),
              ),
          ),
      )
  )
  return models.EncoderDecoderModel(
      module,
      None,
      None,
      optimizer_def=opt,
      decode_fn=decoding.temperature_sample,
      loss_terms=terms,
  )


def _state(model):
  shapes = {k: v.shape for k, v in BATCH.items()}
  variables = jax.jit(lambda r: model.get_initial_variables(r, shapes))(jax.random.PRNGKey(1))
  params = variables['params']
  # As the runtime's StateBuilder: Adafactor factors by the parameters' logical axes.
  model.optimizer_def.set_param_axes(train_state_lib.logical_axes(variables['params_axes'], params))
  # Backbone weights from numpy (larger than the flax init: decoding is not degenerate); method
  # parameters moved away from their no-op values (LoRA's B, IA3's ones, DePT's B are no-ops).
  flat = params_lib.flatten_params(jax.device_get(params))
  backbone = params_lib.flatten_params(lib.random_backbone(CFG, seed=2))
  rng = np.random.RandomState(4)
  for path, value in flat.items():
    if path in backbone:
      flat[path] = backbone[path]
    elif path.endswith(('lora_b', 'lora_embedding_b')):
      flat[path] = 0.3 * rng.normal(size=value.shape).astype(np.float32)
    elif path.endswith('ia3_scaling'):
      flat[path] = (1 + 0.3 * rng.normal(size=value.shape)).astype(np.float32)
  params = params_lib.unflatten_params(flat)
  trainable, frozen = train_state_lib.split_params(params, model.optimizer_def.trainable_filter)
  return train_state_lib.TrainState(
      step=jnp.asarray(0, jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=model.optimizer_def.init_state(trainable),
  )


def _flops(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def _never_pad(logits, state):
  del state
  return logits.at[:, 0].set(-1e10)


def _greedy_without_cache(forward, params, batch):
  enc = batch['encoder_input_tokens']
  out = np.zeros((enc.shape[0], T), np.int32)
  done = np.zeros(enc.shape[0], bool)
  for t in range(T):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], axis=1)
    logits = forward(
        params, dict(batch, decoder_input_tokens=dec_in, decoder_target_tokens=np.ones_like(out))
    )
    token = np.asarray(jnp.argmax(logits[:, t, 1:], axis=-1)) + 1
    out[:, t] = np.where(done, 0, token)
    done |= token == EOS
  return out


@pytest.mark.parametrize('name', list(METHODS))
def test_step_trains_only_the_method_costs_two_forwards_and_decodes_with_the_cache(name):
  model = _model(name)
  state = _state(model)
  method_paths = sorted(params_lib.flatten_params(state.trainable))
  backbone = lib.random_backbone(CFG)
  assert method_paths and not set(method_paths) & set(params_lib.flatten_params(backbone))

  step = (
      jax.jit(
          functools.partial(
              trainer.train_with_lr, learning_rate=0.01, dropout_rng=None, model=model
          )
      )
      .lower(state, BATCH)
      .compile()
  )
  forward = jax.jit(model._compute_logits)  # pylint: disable=protected-access
  ratio = _flops(step) / _flops(forward.lower(state.params, BATCH).compile())
  print(f'{name}: step / forward FLOPs = {ratio:.2f}')
  # Forward + activation backward (2x) + the method's own terms; weight gradients of the backbone
  # would add about another forward (model tuning: about 3x, tests/runtime/test_train_step.py).
  assert 1.5 < ratio <= 2.4, ratio

  new_state, metrics = step(state, BATCH)
  assert np.isfinite(float(metrics['loss']))
  old_frozen = params_lib.flatten_params(state.frozen)
  new_frozen = params_lib.flatten_params(new_state.frozen)
  assert old_frozen.keys() == new_frozen.keys()
  for path, value in old_frozen.items():
    np.testing.assert_array_equal(np.asarray(new_frozen[path]), np.asarray(value), err_msg=path)
  old, new = params_lib.flatten_params(state.trainable), params_lib.flatten_params(
      new_state.trainable
  )
  moved = [p for p in old if not np.array_equal(np.asarray(old[p]), np.asarray(new[p]))]
  assert sorted(moved) == method_paths, sorted(set(method_paths) - set(moved))

  greedy = jax.jit(
      functools.partial(
          model.predict_batch_with_aux, decoder_params={'topk': 1, 'logit_callback_fn': _never_pad}
      )
  )
  decodes = np.asarray(greedy(new_state.params, BATCH)[0])
  expected = _greedy_without_cache(forward, new_state.params, BATCH)
  np.testing.assert_array_equal(decodes, expected)
  assert len(set(expected.ravel().tolist())) >= 3, 'degenerate decodes make a weak test'
