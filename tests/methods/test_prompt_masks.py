"""Attention-mask control (`prompt_tuning.methods.prompt_masks`) through the backbone's mask door.

Every combination of the original code's attention types, single-task and multitask (a leading
task sentinel removed by the prompt's combine function), for the encoder and the decoder-only
prefix and causal LMs, against the masks the original code's tests expect (an independent
per-position transcription of their rules); then the policy in the models: prompt rows that may
not see the inputs do not depend on them, and a decoder-only prefill with a policy gives the
logits of the full forward pass.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import masks
from prompt_tuning import prompts
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5
from prompt_tuning.methods import composition
from prompt_tuning.methods import prompt_masks as pm

P = 4
OPTIONAL = (pm.PROMPT_PROMPT, pm.PROMPT_PROMPT_CAUSAL, pm.PROMPT_INPUT)
SUBSETS = [set(c) for n in range(4) for c in itertools.combinations(OPTIONAL, n)]


def _ids(types):
  return '+'.join(sorted(types)) or 'none'


def _prompt_prompt(types):
  if pm.PROMPT_PROMPT_CAUSAL in types:
    return lambda q, k: k <= q
  if pm.PROMPT_PROMPT in types:
    return lambda q, k: True
  return lambda q, k: q == k


def expected_encoder(lengths, types, width):
  """The original tests' rules: padding masked; prompt rows per the types; input rows see all."""
  pp = _prompt_prompt(types)
  out = np.zeros((len(lengths), P + width, P + width), bool)
  for b, n in enumerate(lengths):
    length = P + n
    for q in range(length):
      for k in range(length):
        if q >= P:
          out[b, q, k] = True
        elif k < P:
          out[b, q, k] = pp(q, k)
        else:
          out[b, q, k] = pm.PROMPT_INPUT in types
  return out


def expected_decoder(prefix, total, types, width, causal_lm=False):
  """Prefix LM: prompt rows per the types (inputs = the prefix only); prefix rows see the prompt
  and the prefix, then causally; target rows causal. Causal LM: causal everywhere."""
  pp = _prompt_prompt(types)
  out = np.zeros((len(prefix), P + width, P + width), bool)
  for b, (n_prefix, n) in enumerate(zip(prefix, total)):
    length = P + n
    for q in range(length):
      for k in range(length):
        if causal_lm:
          out[b, q, k] = k <= q
        elif q < P:
          out[b, q, k] = pp(q, k) if k < P else (k < P + n_prefix and pm.PROMPT_INPUT in types)
        elif q < P + n_prefix:
          out[b, q, k] = k < P + n_prefix or k <= q
        else:
          out[b, q, k] = k <= q
  return out


def _layout(multitask):
  combine = composition.StripLeadingTokens() if multitask else prompts.prefix_prompt
  return lambda tokens, mask: prompts.combine_mask(combine, tokens, mask, P)


def _tokens(lengths, width):
  return (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32) * 5


@pytest.mark.parametrize('multitask', [False, True], ids=['single', 'multitask'])
@pytest.mark.parametrize('types', SUBSETS, ids=_ids)
def test_encoder_masks_match_the_original(types, multitask):
  lengths = np.array([5, 6, 7, 6, 1, 3])
  width = 7
  tokens = _tokens(lengths, width)
  policy = pm.PromptAttention(types)
  m = masks.encoder_masks(tokens, combine_mask=_layout(multitask), attention_policy=policy)
  stripped = lengths - 1 if multitask else lengths
  expected = expected_encoder(stripped, policy.allowable_attention, width - int(multitask))
  np.testing.assert_array_equal(np.asarray(m.attention_mask)[:, 0], expected)


@pytest.mark.parametrize('multitask', [False, True], ids=['single', 'multitask'])
@pytest.mark.parametrize('types', SUBSETS, ids=_ids)
def test_decoder_masks_match_the_original(types, multitask):
  prefix = np.array([4, 6, 2, 3, 5])
  total = prefix + np.array([2, 1, 3, 1, 1])
  width = int(total.max())
  targets = _tokens(total, width)
  causal = _tokens(prefix, width) // 5
  policy = pm.PromptAttention(types)
  n = int(multitask)
  for causal_lm in (False, True):
    m = masks.decoder_masks(
        targets,
        targets,
        causal_attention=None if causal_lm else causal,
        combine_mask=_layout(multitask),
        attention_policy=policy,
    )
    expected = expected_decoder(
        prefix - n, total - n, policy.allowable_attention, width - n, causal_lm
    )
    np.testing.assert_array_equal(np.asarray(m.self_mask)[:, 0], expected, err_msg=str(causal_lm))


def test_types_are_normalized_as_the_original():
  assert pm.PromptAttention().allowable_attention == frozenset(
      {pm.INPUT_INPUT, pm.INPUT_PROMPT, pm.PROMPT_PROMPT_CAUSAL, pm.PROMPT_INPUT}
  )
  assert pm.PromptAttention([]).prompt_prompt == 'self'
  assert pm.PromptAttention(['prompt->prompt']).prompt_prompt == 'full'
  with pytest.raises(ValueError, match='Unknown attention types'):
    pm.PromptAttention(['prompt->everything'])


def test_full_visibility_policy_reproduces_the_default_masks():
  tokens = _tokens([5, 2, 7], 7)
  full = pm.PromptAttention([pm.PROMPT_PROMPT, pm.PROMPT_INPUT])
  layout = _layout(False)
  a = masks.encoder_masks(tokens, combine_mask=layout, attention_policy=full).attention_mask
  b = masks.encoder_masks(tokens, combine_mask=layout).attention_mask
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  causal = _tokens([3, 1, 4], 7) // 5
  a = masks.decoder_masks(
      tokens, tokens, causal_attention=causal, combine_mask=layout, attention_policy=full
  )
  b = masks.decoder_masks(tokens, tokens, causal_attention=causal, combine_mask=layout)
  np.testing.assert_array_equal(np.asarray(a.self_mask), np.asarray(b.self_mask))


# ------------------------------------------------------------------------------ in the models --

CFG = t5.get_config('tiny', vocab_size=32)


def _encode(policy, tokens):
  module = prompted.PromptEncoderDecoder(CFG, prompt_length=P, attention_policy=policy)
  params = module.init(
      jax.random.PRNGKey(0), tokens, tokens[:, :2], tokens[:, :2], enable_dropout=False
  )
  return np.asarray(module.apply(params, tokens, enable_dropout=False, method=module.encode))


def test_encoder_prompt_rows_ignore_the_inputs_unless_allowed():
  a = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], np.int32)
  b = np.array([[11, 12, 13, 0], [14, 15, 0, 0]], np.int32)
  blind = pm.PromptAttention([pm.PROMPT_PROMPT_CAUSAL])
  np.testing.assert_allclose(_encode(blind, a)[:, :P], _encode(blind, b)[:, :P], atol=1e-6)
  assert np.abs(_encode(None, a)[:, :P] - _encode(None, b)[:, :P]).max() > 1e-3
  # The inputs still see the prompt: their rows differ between the policies.
  assert np.abs(_encode(blind, a)[:, P:] - _encode(None, a)[:, P:]).max() > 1e-3


@pytest.mark.parametrize(
    'types', [[pm.PROMPT_PROMPT], [pm.PROMPT_PROMPT_CAUSAL, pm.PROMPT_INPUT]], ids=_ids
)
def test_decoder_only_prefill_with_a_policy_equals_the_full_pass(types):
  policy = pm.PromptAttention(types)
  module = prompted.PromptDecoderOnly(CFG, prompt_length=P, attention_policy=policy)
  targets = np.array([[5, 6, 7, 9, 3, 1], [8, 4, 2, 1, 0, 0]], np.int32)
  tokens = np.concatenate([np.zeros((2, 1), np.int32), targets[:, :-1]], axis=1)
  dca = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], np.int32)
  params = module.init(
      jax.random.PRNGKey(1), tokens, targets, decoder_causal_attention=dca, enable_dropout=False
  )['params']
  params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  full = np.asarray(
      module.apply(
          {'params': params}, tokens, targets, decoder_causal_attention=dca, enable_dropout=False
      )
  )
  length = P + tokens.shape[1]
  _, cache = module.apply(
      {'params': params},
      jnp.ones_like(tokens),
      jnp.ones_like(tokens),
      enable_dropout=False,
      decode=True,
      max_decode_length=length,
      mutable=['cache'],
  )
  inputs = tokens * dca
  prefill, _ = module.apply(
      {'params': params, **cache},
      inputs,
      inputs,
      decoder_causal_attention=dca,
      enable_dropout=False,
      decode=True,
      max_decode_length=length,
      prefill_prompt=True,
      mutable=['cache'],
  )
  prefill = np.asarray(prefill)[:, P:]
  for b in range(2):
    n = int(dca[b].sum())
    np.testing.assert_allclose(prefill[b, :n], full[b, :n], rtol=1e-5, atol=1e-5)
  default = prompted.PromptDecoderOnly(CFG, prompt_length=P)
  other = np.asarray(
      default.apply(
          {'params': params}, tokens, targets, decoder_causal_attention=dca, enable_dropout=False
      )
  )
  assert np.abs(other - full).max() > 1e-3  # the policy changed something


def test_self_only_prompt_cannot_be_decoded_with_the_cache():
  policy = pm.PromptAttention([])
  module = prompted.PromptDecoderOnly(CFG, prompt_length=P, attention_policy=policy)
  tokens = np.array([[0, 5, 6, 0]], np.int32)
  dca = np.array([[1, 1, 1, 0]], np.int32)
  params = module.init(
      jax.random.PRNGKey(1), tokens, tokens, decoder_causal_attention=dca, enable_dropout=False
  )
  _, cache = module.apply(
      params,
      tokens,
      tokens,
      enable_dropout=False,
      decode=True,
      max_decode_length=8,
      mutable=['cache'],
  )
  with pytest.raises(ValueError, match='cannot be decoded with the KV cache'):
    module.apply(
        {'params': params['params'], **cache},
        tokens,
        tokens,
        decoder_causal_attention=dca,
        enable_dropout=False,
        decode=True,
        max_decode_length=8,
        prefill_prompt=True,
        mutable=['cache'],
    )


def test_policy_goes_to_the_prompt_factory_of_composed_methods():
  with pytest.raises(ValueError, match='give the attention_policy to the prompt_factory'):
    prompted.PromptEncoderDecoder(
        CFG, prompt_factory=prompted.make_prompt_factory(3), attention_policy=pm.PromptAttention()
    )
