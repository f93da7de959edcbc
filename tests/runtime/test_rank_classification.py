"""Tests for prompt_tuning.runtime.rank_classification against plain numpy references."""

import numpy as np
import pytest

from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import rank_classification


def test_rank_classification():
  rng = np.random.RandomState(0)
  batch = {
      'encoder_input_tokens': np.array([[5, 6, 1, 0], [7, 1, 0, 0], [8, 9, 3, 1]], np.int32),
      'decoder_target_tokens': np.ones((3, 2), np.int32),  # Ignored.
  }
  candidates = [[10, 1], [11, 12, 1], [13, 1]]
  table = rng.randn(20, 20)

  def score_fn(ex):
    enc, tgt = ex['encoder_input_tokens'], ex['decoder_target_tokens']
    assert enc.shape == (9, 4) and tgt.shape == (9, 3)
    np.testing.assert_array_equal(ex['decoder_input_tokens'][:, 0], 0)
    np.testing.assert_array_equal(ex['decoder_input_tokens'][:, 1:], tgt[:, :-1])
    np.testing.assert_array_equal(ex['decoder_loss_weights'], tgt > 0)
    return np.sum(table[enc[:, :1], tgt] * ex['decoder_loss_weights'], axis=1)

  best, scores = rank_classification.rank_classification(score_fn, batch, candidates)
  assert best.shape == (3,) and scores.shape == (3, 3)
  cands = rank_classification.pad_candidates(candidates)
  np.testing.assert_array_equal(cands, [[10, 1, 0], [11, 12, 1], [13, 1, 0]])
  expected = np.array(
      [
          [sum(table[batch['encoder_input_tokens'][b, 0], t] for t in c) for c in candidates]
          for b in range(3)
      ]
  )
  np.testing.assert_allclose(scores, expected, rtol=1e-5)
  np.testing.assert_array_equal(best, expected.argmax(axis=1))
  expanded = rank_classification.build_rank_classification_batch(batch, candidates)
  np.testing.assert_array_equal(
      expanded['encoder_input_tokens'][3:6],
      np.repeat(batch['encoder_input_tokens'][1:2], 3, axis=0),
  )
  np.testing.assert_array_equal(expanded['decoder_target_tokens'][4], cands[1])
  assert rank_classification.pad_candidates([[4], [5, 1]], eos_id=1).tolist() == [[4, 1], [5, 1]]


def test_normalize_by_length_and_ties():
  batch = {'encoder_input_tokens': np.array([[5, 1], [6, 1]], np.int32)}
  candidates = [[10, 1], [11, 12, 13, 1]]  # 2 and 4 tokens.

  def score_fn(ex):
    # Every target token scores -1 for example 0; example 1 scores 0 for everything.
    per_token = np.where(ex['encoder_input_tokens'][:, :1] == 5, -1.0, 0.0)
    return (per_token * ex['decoder_loss_weights']).sum(axis=1)

  best, scores = rank_classification.rank_classification(score_fn, batch, candidates)
  np.testing.assert_allclose(scores, [[-2, -4], [0, 0]])
  np.testing.assert_array_equal(best, [0, 0])  # Example 1: a tie goes to the lowest index.
  best, scores = rank_classification.rank_classification(
      score_fn, batch, candidates, normalize_by_length=True
  )
  np.testing.assert_allclose(scores, [[-1, -1], [0, 0]])
  assert best.dtype == np.int32 and scores.dtype == np.float32


def test_bad_inputs_are_named():
  batch = {'encoder_input_tokens': np.ones((2, 3), np.int32)}
  with pytest.raises(ValueError, match=r'expected \[4\] scores'):
    rank_classification.rank_classification(lambda ex: np.zeros(3), batch, [[4, 1], [5, 1]])
  with pytest.raises(KeyError, match='encoder_input_tokens'):
    rank_classification.build_rank_classification_batch({'inputs': np.ones((2, 3))}, [[4, 1]])
  with pytest.raises(ValueError, match='empty'):
    rank_classification.pad_candidates([])
  with pytest.raises(ValueError, match='3 tokens, more than the target length 2'):
    rank_classification.pad_candidates([[4, 5, 1]], length=2)


def test_decoding_keeps_only_decoding():
  for name in ('pad_candidates', 'build_rank_classification_batch', 'rank_classification'):
    assert not hasattr(decoding, name), f'decoding.{name} should live in rank_classification'
