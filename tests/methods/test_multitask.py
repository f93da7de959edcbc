"""Shared + per-task prompts (`prompt_tuning.methods.multitask`) against float64 numpy
transcriptions of the original code's combine functions, on the tiny T5 (forward and gradient),
in batches that mix tasks; the `task_index_*` first-token convention; the gin factory."""

import numpy as np
import pytest

import composed_testlib as lib
from prompt_tuning import params as params_lib
from prompt_tuning.methods import composition
from prompt_tuning.methods import multitask

NUM_TASKS = 4  # task 3 has no example in the batch: its row must get no gradient.
TASK_IDS = np.array([0, 1, 2, 0, 2, 1], np.int32)
H = lib.H


def _table(p):
  return p['task_prompts/embedding'][TASK_IDS]


# Float64 transcriptions of `extended/multitask_prompts.py`'s combine functions: shared [P_s, H_s],
# rows of the task table [num_tasks, size] -> [B, P, H].
def ref_add(p):
  return p['shared_prompt'][None] + _table(p).reshape(-1, 4, H)


def ref_concat(p):
  shared = np.broadcast_to(p['shared_prompt'][None], (len(TASK_IDS), 2, H))
  return np.concatenate([shared, _table(p).reshape(-1, 2, H)], axis=1)


def ref_concat_features(p):
  shared = np.broadcast_to(p['shared_prompt'][None], (len(TASK_IDS), 4, 12))
  return np.concatenate([shared, _table(p).reshape(-1, 4, H - 12)], axis=2)


def ref_project(p):
  out = []
  shared = p['shared_prompt']  # [P, H_s]
  h_s = shared.shape[1]
  for row in _table(p):
    kernel = row[: H * h_s].reshape(H, h_s)  # output unit j reads kernel[j]
    bias = row[H * h_s :]
    out.append(np.stack([kernel @ shared[i] + bias for i in range(shared.shape[0])]))
  return np.stack(out)


CASES = {
    'add': (dict(length=4), ref_add, (4, H), (NUM_TASKS, 4 * H)),
    'concat': (dict(length=2, task_length=2), ref_concat, (2, H), (NUM_TASKS, 2 * H)),
    'concat_features': (
        dict(length=4, shared_features=12),
        ref_concat_features,
        (4, 12),
        (NUM_TASKS, 4 * (H - 12)),
    ),
    'project': (dict(length=4, shared_features=8), ref_project, (4, 8), (NUM_TASKS, H * 8 + H)),
}


def _factory(mode, **extra):
  kwargs, *_ = CASES[mode]
  return multitask.multitask_prompt_factory(num_tasks=NUM_TASKS, mode=mode, **kwargs, **extra)


@pytest.mark.parametrize('mode', list(CASES))
def test_combine_modes_match_numpy_forward_and_gradient(mode):
  _, formula, shared_shape, table_shape = CASES[mode]
  factory = _factory(mode)
  assert factory.length == lib.PROMPT_LENGTH
  enc, dec, tgt = lib.batch()
  features = {'task_ids': TASK_IDS}
  init = lib.init_prompt_params(factory, enc, features)
  assert init['shared_prompt'].shape == shared_shape
  assert init['task_prompts']['embedding'].shape == table_shape
  params = lib.random_like(init, seed=1)
  grads = lib.check_against_reference(factory, params, formula, features)
  # Training a mixture updates the shared prompt and the rows of the batch's tasks only.
  table = grads['task_prompts/embedding']
  assert np.abs(grads['shared_prompt']).max() > 0
  assert all(np.abs(table[t]).max() > 0 for t in set(TASK_IDS.tolist()))
  assert np.all(table[3] == 0)
  lib.alone_equals_mixed(factory, params, features, enc, dec, tgt)


def test_task_index_first_token_is_read_and_stripped():
  """`task_index_*` inputs: `<extra_id_k>` first (k = vocab_size - 1 - token) names the task and
  is removed (from the embedded inputs and the masks) before the prompt is prepended."""
  vocab = lib.CFG.vocab_size
  sentinels = (vocab - 1 - TASK_IDS,)
  enc, dec, tgt = lib.batch(first_tokens=sentinels)
  factory = _factory('add', id_source='first_token', vocab_size=vocab)
  assert isinstance(factory.combine, composition.StripLeadingTokens)
  init = lib.init_prompt_params(factory, enc)
  params = lib.random_like(init, seed=2)
  lib.check_against_reference(
      factory, params, ref_add, None, enc=enc, dec=dec, tgt=tgt, first_tokens=1
  )
  # The same examples with `task_ids` features instead of sentinels give the same logits.
  with_ids = lib.composed_loss_grads(
      _factory('add'), params, enc[:, 1:], dec, tgt, {'task_ids': TASK_IDS}
  )
  with_tokens = lib.composed_loss_grads(factory, params, enc, dec, tgt)
  np.testing.assert_allclose(with_tokens[1], with_ids[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(composition.sentinel_to_index(np.array([32099, 32092]))), [0, 7]
  )


def test_missing_task_ids_is_one_clear_error():
  enc, dec, tgt = lib.batch()
  factory = _factory('add')
  params = lib.init_prompt_params(factory, enc)
  with pytest.raises(ValueError, match='needs a per-example `task_ids` feature'):
    lib.composed_loss_grads(factory, params, enc, dec, tgt)


def test_mode_errors():
  with pytest.raises(ValueError, match='mode must be one of'):
    multitask.multitask_prompt_factory(4, 2, mode='sum')
  with pytest.raises(ValueError, match='id_source'):
    multitask.multitask_prompt_factory(4, 2, id_source='token')
  enc, _, _ = lib.batch()
  bad = multitask.multitask_prompt_factory(4, 2, mode='concat_features', shared_features=40)
  with pytest.raises(ValueError, match='must equal the model width'):
    lib.init_prompt_params(bad, enc)
