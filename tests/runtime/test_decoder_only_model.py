"""`models.DecoderOnlyModel`: cached greedy decoding against full forward passes, scores against the loss.

Causal LM and prefix LM (T5X's `inputs_bidirectional_attention`, seqio's PrefixLM features), each with
and without a soft prompt. The reference decodes without a cache: at every step the whole sequence so
far goes through the network again (the prefix bidirectional where the model says so) and the argmax at
its last position is appended.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_methods
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models

EOS, VOCAB, LENGTH = 1, 32, 12
# seqio.PrefixLMFeatureConverter layout: inputs (ending in EOS) then targets, shifted right; the
# causal-attention feature covers BOS and the inputs.
INPUTS = [[9, 4, 6, 1], [5, 7, 1], [3, 8, 11, 12, 13, 1], [20, 1]]
TARGETS = [[7, 3, 1], [2, 9, 9, 1], [4, 1], [6, 6, 6, 6, 1]]


def _batch():
  n = len(INPUTS)
  target = np.zeros((n, LENGTH), np.int32)
  dca = np.zeros((n, LENGTH), np.int32)
  weights = np.zeros((n, LENGTH), np.float32)
  for i, (x, y) in enumerate(zip(INPUTS, TARGETS)):
    seq = x + y
    target[i, : len(seq)] = seq
    dca[i, : len(x) + 1] = 1
    weights[i, len(x) : len(seq)] = 1
  inputs = np.concatenate([np.zeros((n, 1), np.int32), target[:, :-1]], axis=1)
  return {
      'decoder_input_tokens': inputs,
      'decoder_target_tokens': target,
      'decoder_causal_attention': dca,
      'decoder_loss_weights': weights,
  }


@pytest.fixture(
    scope='module',
    params=[
        (False, 0, False),
        (False, 3, False),
        (True, 0, False),
        (True, 3, False),
        (False, 3, True),
        (True, 3, True),
    ],
    ids=[
        'causal',
        'causal-prompt',
        'prefix',
        'prefix-prompt',
        'causal-prompt-hooks',
        'prefix-prompt-hooks',
    ],
)
def case(request):
  bidirectional, prompt_length, with_hooks = request.param
  config = t5.get_config('tiny', vocab_size=VOCAB)
  # With hooks: every backbone door in use (per-layer shifts, prefix keys, key/value and MLP
  # rescaling, low-rank kernel updates), see tests/toy_methods.py.
  method = toy_methods.all_doors() if with_hooks else None
  module = (
      prompted.PromptDecoderOnly(config, prompt_length=prompt_length, hooks=method)
      if prompt_length
      else t5.DecoderOnly(config)
  )
  model = models.DecoderOnlyModel(
      module,
      None,
      decode_fn=decoding.temperature_sample,
      inputs_bidirectional_attention=bidirectional,
      z_loss=0.0,
      loss_normalizing_factor=None,
  )
  batch = _batch()
  params = model.get_initial_variables(
      jax.random.PRNGKey(7), {k: v.shape for k, v in batch.items()}
  )['params']
  # Larger weights so greedy decodes differ between examples and steps.
  params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  return {
      'model': model,
      'params': params,
      'batch': batch,
      'bidirectional': bidirectional,
      'greedy': jax.jit(
          functools.partial(
              model.predict_batch_with_aux,
              decoder_params={'topk': 1, 'logit_callback_fn': _never_pad},
          )
      ),
      'forward': jax.jit(model._compute_logits),  # pylint: disable=protected-access
      'score': jax.jit(model.score_batch),
      'loss': jax.jit(lambda p, b: model.loss_fn(p, b, dropout_rng=None)),
  }


def _never_pad(logits, state):
  """Token 0 is both padding and BOS in T5: a generated 0 would read as padding (as in T5X)."""
  del state
  return logits.at[:, 0].set(-1e10)


def _greedy_without_cache(case):
  """Continuation of each example's inputs by full forward passes (stops after EOS or at LENGTH)."""
  out = np.zeros((len(INPUTS), LENGTH), np.int32)
  for i, x in enumerate(INPUTS):
    seq = [0] + list(x)  # shifted-right decoder inputs: BOS, then the inputs
    generated = []
    while len(generated) < LENGTH - len(x):
      tokens = np.zeros((1, LENGTH), np.int32)
      tokens[0, : len(seq)] = seq
      batch = {'decoder_input_tokens': tokens, 'decoder_target_tokens': np.ones_like(tokens)}
      if case['bidirectional']:
        dca = np.zeros_like(tokens)
        dca[0, : len(x) + 1] = 1
        batch['decoder_causal_attention'] = dca
      logits = np.asarray(case['forward'](case['params'], batch))
      token = int(np.argmax(logits[0, len(seq) - 1, 1:])) + 1  # never 0, see `_never_pad`
      generated.append(token)
      seq.append(token)
      if token == EOS:
        break
    out[i, : len(generated)] = generated
  return out


def test_cached_greedy_decoding_equals_full_forward_passes(case):
  batch = dict(case['batch'])
  # At inference only the inputs are known: targets are zeroed out of the decoder inputs.
  batch['decoder_input_tokens'] = batch['decoder_input_tokens'] * batch['decoder_causal_attention']
  decodes, aux = case['greedy'](case['params'], batch)
  expected = _greedy_without_cache(case)
  np.testing.assert_array_equal(np.asarray(decodes), expected)
  assert aux['scores'].shape == (len(INPUTS),)
  # Several samples per example (rows repeated per example): greedy, so each equals the decode.
  many, _ = case['model'].predict_batch_with_aux(
      case['params'],
      batch,
      num_decodes=2,
      return_all_decodes=True,
      decoder_params={'topk': 1, 'logit_callback_fn': _never_pad},
  )
  np.testing.assert_array_equal(np.asarray(many), np.stack([expected, expected], axis=1))
  # Not degenerate: the examples decode differently and use several tokens.
  assert len({tuple(r) for r in expected.tolist()}) == len(INPUTS)
  assert len(set(expected.ravel().tolist())) >= 4


def test_score_batch_is_the_summed_target_log_likelihood(case):
  batch = case['batch']
  logits = np.asarray(case['forward'](case['params'], batch), np.float64)
  logp = (
      logits
      - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
      - logits.max(-1, keepdims=True)
  )
  token_logp = np.take_along_axis(logp, batch['decoder_target_tokens'][..., None], -1)[..., 0]
  expected = np.sum(token_logp * batch['decoder_loss_weights'], axis=-1)
  np.testing.assert_allclose(
      np.asarray(case['score'](case['params'], batch)), expected, rtol=1e-5, atol=1e-5
  )
  loss, metrics = case['loss'](case['params'], batch)
  np.testing.assert_allclose(float(loss), -expected.sum(), rtol=1e-5)
  assert float(metrics['num_tokens']) == batch['decoder_loss_weights'].sum()


def test_prefix_lm_sees_the_whole_prefix(case):
  """The bidirectional prefix matters: a later input token changes an earlier position's logits."""
  batch = dict(case['batch'])
  changed = dict(batch, decoder_input_tokens=batch['decoder_input_tokens'].copy())
  changed['decoder_input_tokens'][:, 2] = (changed['decoder_input_tokens'][:, 2] + 5) % VOCAB
  a = np.asarray(case['forward'](case['params'], batch))[:, 1]
  b = np.asarray(case['forward'](case['params'], changed))[:, 1]
  if case['bidirectional']:
    assert np.abs(a - b).max() > 1e-4
  else:
    np.testing.assert_allclose(a, b, atol=1e-6)
