"""Factorized language x task prompts (`prompt_tuning.methods.factorized`) against a float64 numpy
transcription of `[P_lang[l]; P_task[t]]` on the tiny T5 (forward and gradient), in a batch that
mixes 3 tasks and 2 languages; stage (a) without the task prompt; the two-sentinel convention."""

import numpy as np
import pytest

import composed_testlib as lib
from prompt_tuning.methods import factorized

H = lib.H
NUM_LANGS, NUM_TASKS = 3, 4  # language 2 and task 3 have no example in the batch
LANG_IDS = np.array([0, 1, 1, 0, 0, 1], np.int32)
TASK_IDS = np.array([0, 1, 2, 2, 1, 0], np.int32)
FEATURES = {'lang_ids': LANG_IDS, 'task_ids': TASK_IDS}


def ref_factorized(p, lang_ids=LANG_IDS, task_ids=TASK_IDS):
  """[P_lang[l]; P_task[t]]: rows of the flattened tables reshaped to [length, H]."""
  lang = p['lang_prompts/embedding'][lang_ids].reshape(len(lang_ids), -1, H)
  task = p['task_prompts/embedding'][task_ids].reshape(len(task_ids), -1, H)
  return np.concatenate([lang, task], axis=1)


def _factory(**kwargs):
  return factorized.factorized_prompt_factory(1, 3, NUM_LANGS, NUM_TASKS, **kwargs)


@pytest.fixture(scope='module')
def params():
  enc, _, _ = lib.batch()
  init = lib.init_prompt_params(_factory(), enc, FEATURES)
  assert init['lang_prompts']['embedding'].shape == (NUM_LANGS, 1 * H)
  assert init['task_prompts']['embedding'].shape == (NUM_TASKS, 3 * H)
  return lib.random_like(init, seed=3)


def test_forward_and_gradient_match_numpy_in_a_mixed_batch(params):
  factory = _factory()
  assert factory.length == lib.PROMPT_LENGTH
  grads = lib.check_against_reference(factory, params, ref_factorized, FEATURES)
  lang, task = grads['lang_prompts/embedding'], grads['task_prompts/embedding']
  assert np.abs(lang[0]).max() > 0 and np.abs(lang[1]).max() > 0
  assert all(np.abs(task[t]).max() > 0 for t in range(3))
  assert np.all(lang[2] == 0) and np.all(task[3] == 0)
  lib.alone_equals_mixed(factory, params, FEATURES)


def test_stage_b_trains_only_the_task_prompt_with_the_language_prompt_frozen(params):
  """Stage (b): the language table is a constant; only the task rows get gradients."""
  grads = lib.check_against_reference(
      _factory(), params, ref_factorized, FEATURES, trainable=['task_prompts']
  )
  assert list(grads) == ['task_prompts/embedding']


def test_stage_a_language_prompt_alone():
  """Stage (a): `use_task_prompt=False` has no task table and the prompt is P_lang[l]."""
  factory = factorized.factorized_prompt_factory(4, 3, NUM_LANGS, NUM_TASKS, use_task_prompt=False)
  assert factory.length == 4
  enc, _, _ = lib.batch()
  init = lib.init_prompt_params(factory, enc, {'lang_ids': LANG_IDS})
  assert sorted(init) == ['lang_prompts']
  p = lib.random_like(init, seed=4)
  formula = lambda q: q['lang_prompts/embedding'][LANG_IDS].reshape(len(LANG_IDS), 4, H)
  lib.check_against_reference(factory, p, formula, {'lang_ids': LANG_IDS})


def test_two_leading_sentinels_name_language_and_task(params):
  vocab = lib.CFG.vocab_size
  enc, dec, tgt = lib.batch(first_tokens=(vocab - 1 - LANG_IDS, vocab - 1 - TASK_IDS))
  factory = _factory(id_source='first_token', vocab_size=vocab)
  lib.check_against_reference(
      factory, params, ref_factorized, None, enc=enc, dec=dec, tgt=tgt, first_tokens=2
  )


def test_zero_shot_swaps_the_language_prompt(params):
  """Stage (c): the same examples with another `lang_ids` use that language's prompt."""
  enc, dec, tgt = lib.batch()
  other = 1 - LANG_IDS
  _, logits, _ = lib.composed_loss_grads(
      _factory(), params, enc, dec, tgt, {'lang_ids': other, 'task_ids': TASK_IDS}
  )
  flat = {k: np.asarray(v, np.float64) for k, v in lib.params_lib.flatten_params(params).items()}
  _, ref_logits, _ = lib.reference(ref_factorized(flat, other, TASK_IDS), enc, dec, tgt)
  lib.assert_close(logits, ref_logits, 1e-5, 'logits with the swapped languages')
