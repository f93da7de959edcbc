"""Wayward prompts (`methods/wayward.py`): the term, its gradient and its place in the loss.

float64 numpy oracle of the original's term: `gamma * sum((P - D)^2) / l` and its gradient
`2 gamma (P - D) / l`, with `D` the embedded pieces of the task description in a zero matrix; the
prompt initialized from the same string equals `D` (the term starts at 0); through the runtime's
loss door the model's loss is the cross entropy plus the term, and the step's gradient gains the
term's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import methods_testlib as lib
from prompt_tuning import prompts
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import wayward
from prompt_tuning.runtime import models

CFG = lib.tiny_config()
TEXT = 'the cat sat'


@pytest.fixture(scope='module')
def vocab():
  seqio = pytest.importorskip('seqio')
  import os  # pylint: disable=g-import-not-at-top

  path = os.path.join(
      os.path.dirname(seqio.__file__), 'test_data', 'sentencepiece', 'sentencepiece.model'
  )
  return seqio.SentencePieceVocabulary(path)


def test_term_gradient_and_initialization_equal_numpy(vocab):
  rng = np.random.RandomState(8)
  table = rng.normal(size=(lib.VOCAB, CFG.emb_dim)).astype(np.float32)
  ids = list(vocab.encode(TEXT))
  n = wayward.length(vocab, TEXT)
  assert n == len(ids) >= 3
  l = n + 2  # a longer prompt: the rows after the text are zeros in D
  term = wayward.WaywardLoss(table, vocab, TEXT, prompt_length=l, gamma=0.05)
  d = np.zeros((l, CFG.emb_dim))
  d[:n] = table[ids]
  np.testing.assert_allclose(term.target, d, rtol=0, atol=0)
  prompt = rng.normal(size=(l, CFG.emb_dim)).astype(np.float32)
  params = {'encoder': {'prompt': {'prompt': {'prompt': jnp.asarray(prompt)}}}}
  value, metrics = term(params, {}, {})
  p64 = prompt.astype(np.float64)
  np.testing.assert_allclose(float(value), 0.05 * np.sum((p64 - d) ** 2) / l, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['distance']), np.sum((p64 - d) ** 2) / l, rtol=1e-6)
  grad = jax.grad(lambda p: term(p, {}, {})[0])(params)['encoder']['prompt']['prompt']['prompt']
  np.testing.assert_allclose(np.asarray(grad), 2 * 0.05 * (p64 - d) / l, rtol=1e-5, atol=1e-7)
  # The prompt initialized from the same string is D: the term starts at 0.
  init = prompts.from_embedded_string(table, vocab, TEXT, initializer=prompts.zeros())
  np.testing.assert_array_equal(np.asarray(init(jax.random.PRNGKey(0), (l, CFG.emb_dim))), d)


def test_the_term_enters_the_model_loss_and_its_gradient(vocab):
  base = lib.random_backbone(CFG, seed=9)
  table = np.asarray(base['token_embedder']['embedding'])
  n = wayward.length(vocab, TEXT)
  term = wayward.WaywardLoss(table, vocab, TEXT, gamma=0.01)
  module = prompted.PromptEncoderDecoder(CFG, prompt_length=n)
  plain = models.EncoderDecoderModel(module, None, None)
  with_term = models.EncoderDecoderModel(module, None, None, loss_terms=(term,))
  enc, tgt = lib.batch()
  batch = {
      'encoder_input_tokens': enc.astype(np.int32),
      'decoder_input_tokens': lib.decoder_inputs(tgt).astype(np.int32),
      'decoder_target_tokens': tgt.astype(np.int32),
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
  }
  prompt = term.target + np.random.RandomState(1).normal(size=term.target.shape).astype(np.float32)
  params = lib.with_method_params(base, {'encoder/prompt/prompt/prompt': prompt})
  value_and_grad = lambda m: jax.jit(
      jax.value_and_grad(lambda p: m.loss_fn(p, batch, None), has_aux=True)
  )(params)
  (loss, metrics), grads = value_and_grad(with_term)
  (base_loss, _), base_grads = value_and_grad(plain)
  expected_term = 0.01 * np.sum((prompt.astype(np.float64) - term.target) ** 2) / n
  np.testing.assert_allclose(float(loss), float(base_loss) + expected_term, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_terms/wayward']), expected_term, rtol=1e-5)
  g = lambda t: np.asarray(t['encoder']['prompt']['prompt']['prompt'])
  np.testing.assert_allclose(
      g(grads) - g(base_grads), 0.02 * (prompt - term.target) / n, rtol=1e-3, atol=1e-6
  )
