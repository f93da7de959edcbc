"""Tests for prompt_tuning.masks: exact mask values including padding."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import masks
from prompt_tuning import prompts

TOKENS = np.array([[5, 6, 0], [7, 0, 0]])
P = 2


def _outer(v):
  v = np.asarray(v, bool)
  return (v[:, None] & v[None, :]).astype(np.float32)


def test_add_fake_prompt():
  np.testing.assert_array_equal(
      np.asarray(masks.add_fake_prompt(TOKENS, P)), [[1, 1, 5, 6, 0], [1, 1, 7, 0, 0]]
  )
  np.testing.assert_array_equal(
      np.asarray(masks.add_fake_prompt(TOKENS, P, fill_value=9)), [[9, 9, 5, 6, 0], [9, 9, 7, 0, 0]]
  )
  np.testing.assert_array_equal(
      np.asarray(masks.add_fake_prompt(TOKENS, P, combine=prompts.suffix_prompt)),
      [[5, 6, 1, 1, 0], [7, 1, 1, 0, 0]],
  )
  assert masks.add_fake_prompt(TOKENS, 0).shape == TOKENS.shape


def test_encoder_mask_exact():
  mask = np.asarray(masks.prompt_encoder_mask(TOKENS, P))
  assert mask.shape == (2, 1, 5, 5) and mask.dtype == np.float32
  np.testing.assert_array_equal(mask[0, 0], _outer([1, 1, 1, 1, 0]))
  np.testing.assert_array_equal(mask[1, 0], _outer([1, 1, 1, 0, 0]))
  # Written out for row 1: prompt <-> prompt and prompt <-> token 7 visible.
  np.testing.assert_array_equal(
      mask[1, 0],
      [
          [1, 1, 1, 0, 0],
          [1, 1, 1, 0, 0],
          [1, 1, 1, 0, 0],
          [0, 0, 0, 0, 0],
          [0, 0, 0, 0, 0],
      ],
  )


def test_encoder_mask_matches_flax_with_fake_prompt():
  with_prompt = masks.add_fake_prompt(TOKENS, P)
  expected = nn.make_attention_mask(with_prompt > 0, with_prompt > 0)
  np.testing.assert_array_equal(
      np.asarray(masks.prompt_encoder_mask(TOKENS, P)), np.asarray(expected)
  )


def test_encoder_mask_factory_dtype_and_suffix_layout():
  fn = masks.create_prompt_encoder_mask(P)
  mask = fn(TOKENS, None, jnp.bfloat16)
  assert mask.dtype == jnp.bfloat16
  suffix = np.asarray(masks.create_prompt_encoder_mask(P, combine=prompts.suffix_prompt)(TOKENS))
  np.testing.assert_array_equal(suffix[0, 0], _outer([1, 1, 1, 1, 0]))
  np.testing.assert_array_equal(suffix[1, 0], _outer([1, 1, 1, 0, 0]))


def test_encoder_decoder_mask_exact():
  targets = np.array([[3, 4], [5, 0]])
  mask = np.asarray(masks.prompt_encoder_decoder_mask(targets, TOKENS, P))
  assert mask.shape == (2, 1, 2, 5)
  np.testing.assert_array_equal(mask[0, 0], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(mask[1, 0], [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
  decode = np.asarray(masks.create_prompt_encoder_decoder_mask(P)(targets, TOKENS, decode=True))
  np.testing.assert_array_equal(decode[1, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_decoder_only_causal_mask_exact():
  targets = np.array([[4, 5, 0]])
  mask = np.asarray(masks.prompt_decoder_only_mask(targets, P))
  assert mask.shape == (1, 1, 5, 5)
  np.testing.assert_array_equal(
      mask[0, 0],
      [
          [1, 0, 0, 0, 0],
          [1, 1, 0, 0, 0],
          [1, 1, 1, 0, 0],
          [1, 1, 1, 1, 0],
          [0, 0, 0, 0, 0],
      ],
  )


def test_decoder_only_prefix_mask_exact():
  targets = np.array([[4, 5, 6, 0], [4, 5, 6, 7]])
  causal_attention = np.array([[1, 1, 0, 0], [1, 0, 0, 0]])
  mask = np.asarray(masks.create_prompt_decoder_only_mask(P)(targets, causal_attention))
  assert mask.shape == (2, 1, 6, 6)
  # Prompt and inputs (prefix) see each other; targets are causal.
  np.testing.assert_array_equal(
      mask[0, 0],
      [
          [1, 1, 1, 1, 0, 0],
          [1, 1, 1, 1, 0, 0],
          [1, 1, 1, 1, 0, 0],
          [1, 1, 1, 1, 0, 0],
          [1, 1, 1, 1, 1, 0],
          [0, 0, 0, 0, 0, 0],
      ],
  )
  np.testing.assert_array_equal(
      mask[1, 0],
      [
          [1, 1, 1, 0, 0, 0],
          [1, 1, 1, 0, 0, 0],
          [1, 1, 1, 0, 0, 0],
          [1, 1, 1, 1, 0, 0],
          [1, 1, 1, 1, 1, 0],
          [1, 1, 1, 1, 1, 1],
      ],
  )


def test_make_decoder_mask_matches_flax():
  targets = np.array([[4, 5, 6, 0]])
  expected = nn.combine_masks(
      nn.make_causal_mask(targets), nn.make_attention_mask(targets > 0, targets > 0)
  )
  np.testing.assert_array_equal(np.asarray(masks.make_decoder_mask(targets)), np.asarray(expected))


def test_packing_rejected():
  segments = np.ones_like(TOKENS)
  with pytest.raises(ValueError, match='packed'):
    masks.prompt_encoder_mask(TOKENS, P, segments)
  with pytest.raises(ValueError, match='packed'):
    masks.create_prompt_encoder_decoder_mask(P)(TOKENS, TOKENS, segments)
  with pytest.raises(ValueError, match='packed'):
    masks.create_prompt_decoder_only_mask(P)(TOKENS, None, segments)
