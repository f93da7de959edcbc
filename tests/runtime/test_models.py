"""`models.EncoderDecoderModel`: cached decoding against full forward passes, beam(1) = greedy, scores = -loss.

The references are written independently of the model's decoding code: a plain numpy greedy loop that
re-runs the whole (prompted) network on the growing decoder input at every step, and the model's own
teacher-forced `loss_fn` on one example at a time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runtime_testlib as rt
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models

BATCH, ENC_LEN, DEC_LEN, EOS = 4, 10, 7, 1


@pytest.fixture(scope='module')
def vocab():
  import seqio  # pylint: disable=g-import-not-at-top

  return seqio.SentencePieceVocabulary(rt.vocab_path())


@pytest.fixture(scope='module')
def setup(vocab):
  """A tiny T5 1.1 with a 3-token soft prompt (the prompt enters decoding through the encoded inputs)."""
  config = t5.get_config('tiny', vocab_size=32)
  module = prompted.PromptEncoderDecoder(config, prompt_length=3)
  rng = np.random.default_rng(0)
  enc = rng.integers(3, 26, size=(BATCH, ENC_LEN)).astype(np.int32)
  for i, n in enumerate([10, 7, 4, 2]):  # padded rows, EOS last
    enc[i, n - 1] = EOS
    enc[i, n:] = 0
  targets = rng.integers(3, 26, size=(BATCH, DEC_LEN)).astype(np.int32)
  weights = np.ones_like(targets)
  for i, n in enumerate([7, 5, 3, 1]):
    targets[i, n - 1] = EOS
    targets[i, n:] = 0
    weights[i, n:] = 0
  dec_in = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
  batch = {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': dec_in,
      'decoder_target_tokens': targets,
      'decoder_loss_weights': weights,
  }
  shapes = {k: v.shape for k, v in batch.items()}
  # Larger-than-default weights so greedy decodes vary between examples and positions.
  base = models.EncoderDecoderModel(module, vocab, vocab)
  params = base.get_initial_variables(jax.random.PRNGKey(3), shapes)['params']
  params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  return module, params, batch


@pytest.fixture(scope='module')
def fns(setup, vocab):
  """The jitted functions under test, compiled once per model (parameters are arguments)."""
  module, _, _ = setup
  greedy_model = models.EncoderDecoderModel(
      module, vocab, vocab, decode_fn=decoding.temperature_sample
  )
  beam_model = models.EncoderDecoderModel(module, vocab, vocab, decode_fn=decoding.beam_search)
  score_model = models.EncoderDecoderModel(
      module, vocab, vocab, z_loss=0.0, loss_normalizing_factor=None
  )
  return {
      'greedy': jax.jit(
          functools.partial(greedy_model.predict_batch_with_aux, decoder_params={'topk': 1})
      ),
      'beam': jax.jit(
          functools.partial(
              beam_model.predict_batch_with_aux, num_decodes=1, decoder_params={'alpha': 0.0}
          )
      ),
      'forward': jax.jit(greedy_model._compute_logits),  # pylint: disable=protected-access
      'score': jax.jit(score_model.score_batch),
      'loss': jax.jit(lambda p, b: score_model.loss_fn(p, b, dropout_rng=None)),
  }


def _greedy_without_cache(forward, params, batch):
  """Greedy decoding by full forward passes over the whole prefix at each step (no cache)."""
  enc = batch['encoder_input_tokens']
  out = np.zeros((enc.shape[0], DEC_LEN), np.int32)
  done = np.zeros(enc.shape[0], bool)
  for t in range(DEC_LEN):
    dec_in = np.concatenate([np.zeros((enc.shape[0], 1), np.int32), out[:, :-1]], axis=1)
    # Every position counts as a real target (0 would mark it as padding); attention is causal anyway.
    logits = forward(
        params,
        {
            'encoder_input_tokens': enc,
            'decoder_input_tokens': dec_in,
            'decoder_target_tokens': np.ones_like(out),
        },
    )
    token = np.asarray(jnp.argmax(logits[:, t, :], axis=-1))
    out[:, t] = np.where(done, 0, token)
    done |= token == EOS
  return out


def _log_prob(forward, params, batch, seqs):
  """Sum of the log-probabilities of `seqs` [B, T] (up to and including EOS) by a full forward pass."""
  logits = forward(
      params,
      {
          'encoder_input_tokens': batch['encoder_input_tokens'],
          'decoder_input_tokens': np.concatenate([np.zeros((BATCH, 1), np.int32), seqs[:, :-1]], 1),
          'decoder_target_tokens': np.ones_like(seqs),
      },
  )
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  token_logp = np.take_along_axis(logp, seqs[..., None], axis=-1)[..., 0]
  return np.sum(token_logp * (seqs > 0), axis=-1)


def test_cached_greedy_decoding_equals_full_forward_passes(setup, fns):
  _, params, batch = setup
  decodes, aux = fns['greedy'](params, batch)
  expected = _greedy_without_cache(fns['forward'], params, batch)
  np.testing.assert_array_equal(np.asarray(decodes), expected)
  assert aux['scores'].shape == (BATCH,)
  # The decodes are not degenerate (the comparison would be weak otherwise).
  assert len({tuple(r) for r in expected.tolist()}) == BATCH
  assert len(set(expected.ravel().tolist())) >= 4


def test_beam_search_with_one_beam_equals_greedy(setup, fns):
  _, params, batch = setup
  # EOS logit pinned to 0 while the others are large: no hypothesis ever ends early, so the single beam
  # must follow the greedy path exactly.
  params = jax.tree_util.tree_map(lambda x: x, params)
  kernel = np.array(params['decoder']['logits_dense']['kernel']) * 3.0
  kernel[:, EOS] = 0.0
  params['decoder']['logits_dense']['kernel'] = jnp.asarray(kernel)
  greedy = np.asarray(fns['greedy'](params, batch)[0])
  beam, aux = fns['beam'](params, batch)
  beam = np.asarray(beam)
  assert not np.any(greedy == EOS)
  np.testing.assert_array_equal(beam, greedy)
  # With alpha = 0 the beam score is the log-probability of the decode.
  np.testing.assert_allclose(
      np.asarray(aux['scores']),
      _log_prob(fns['forward'], params, batch, beam),
      rtol=1e-4,
      atol=1e-4,
  )


def test_beam_search_with_one_beam_general_case(setup, fns):
  """T5X's beam search keeps finished hypotheses apart: with one beam it returns the greedy decode or a
  greedy prefix ended by EOS, whichever completed hypothesis is most likely."""
  _, params, batch = setup
  greedy = np.asarray(fns['greedy'](params, batch)[0])
  beam, aux = fns['beam'](params, batch)
  beam, scores = np.asarray(beam), np.asarray(aux['scores'])
  np.testing.assert_allclose(
      scores, _log_prob(fns['forward'], params, batch, beam), rtol=1e-4, atol=1e-4
  )
  greedy_logp = _log_prob(fns['forward'], params, batch, greedy)
  for i in range(BATCH):
    if np.array_equal(beam[i], greedy[i]):
      continue
    k = int(np.argmax(beam[i] == EOS))
    assert beam[i, k] == EOS and np.all(beam[i, k + 1 :] == 0), beam[i]
    np.testing.assert_array_equal(beam[i, :k], greedy[i, :k])
    if EOS in greedy[i]:  # both complete: beam found the more likely one
      assert scores[i] >= greedy_logp[i] - 1e-4


def test_score_batch_is_the_negated_summed_loss(setup, fns):
  _, params, batch = setup
  scores = np.asarray(fns['score'](params, batch))
  assert scores.shape == (BATCH,) and np.all(scores < 0)
  for i in range(BATCH):
    one = {
        k: np.repeat(v[i : i + 1], BATCH, axis=0) for k, v in batch.items()
    }  # same shapes: no recompile
    loss, metrics = fns['loss'](params, one)
    np.testing.assert_allclose(scores[i], -float(loss) / BATCH, rtol=1e-5)
    assert float(metrics['num_tokens']) == BATCH * batch['decoder_loss_weights'][i].sum()
  # Padding positions do not count (the summed batch loss is the sum of the per-example scores).
  total, _ = fns['loss'](params, batch)
  np.testing.assert_allclose(-scores.sum(), float(total), rtol=1e-5)
