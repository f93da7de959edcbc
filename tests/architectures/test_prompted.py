"""Tests for prompt_tuning.architectures.prompted (prompted T5 backbones, prompt banks)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning import prompts
from prompt_tuning import params as params_lib
from prompt_tuning.architectures import prompted
from prompt_tuning.architectures import t5

P = 3
CFG = t5.get_config('tiny')
ENC = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 1, 0, 0, 0, 0]], np.int32)
DEC_TGT = np.array([[12, 13, 1, 0], [14, 1, 0, 0], [15, 16, 17, 1]], np.int32)
DEC_IN = np.concatenate([np.zeros((3, 1), np.int32), DEC_TGT[:, :-1]], axis=1) * (DEC_TGT > 0)


def _forward(model, params, enc, dec_in, dec_tgt, **kw):
  return model.apply({'params': params}, enc, dec_in, dec_tgt, enable_dropout=False, **kw)


@pytest.fixture(scope='module')
def encdec():
  model = prompted.PromptEncoderDecoder(CFG, prompt_length=P)
  variables = model.init(jax.random.PRNGKey(0), ENC, DEC_IN, DEC_TGT, enable_dropout=False)
  fwd = jax.jit(functools.partial(_forward, model))
  return model, variables, fwd


def test_param_tree(encdec):
  _, variables, _ = encdec
  flat = params_lib.flatten_params(variables['params'])
  backbone = t5.EncoderDecoder(CFG).init(
      jax.random.PRNGKey(0), ENC, DEC_IN, DEC_TGT, enable_dropout=False
  )
  backbone_flat = params_lib.flatten_params(backbone['params'])
  assert set(flat) == set(backbone_flat) | {'encoder/prompt/prompt/prompt'}
  for path, value in backbone_flat.items():
    assert flat[path].shape == value.shape, path
  prompt = flat['encoder/prompt/prompt/prompt']
  assert prompt.shape == (P, CFG.emb_dim) and prompt.dtype == jnp.float32
  assert float(jnp.min(prompt)) >= -0.5 and float(jnp.max(prompt)) < 0.5
  axes = variables['params_axes']['encoder']['prompt']['prompt']['prompt_axes']
  assert axes.names == ('prompt', 'prompt_embed')


def test_logits_and_encoded_shapes(encdec):
  model, variables, fwd = encdec
  logits = fwd(variables['params'], ENC, DEC_IN, DEC_TGT)
  assert logits.shape == (3, 4, CFG.vocab_size) and logits.dtype == jnp.float32
  encoded = model.apply(variables, ENC, enable_dropout=False, method=model.encode)
  assert encoded.shape == (3, P + ENC.shape[1], CFG.emb_dim)
  mask = model.apply(variables, ENC, method=model.encoder_input_mask)
  np.testing.assert_array_equal(
      np.asarray(mask), np.concatenate([np.ones((3, P), bool), ENC > 0], axis=1)
  )
  assert model.prompt_length == P
  assert prompted.PromptEncoderDecoder(CFG, P).prompt_length == P


def test_prompt_is_used_and_padding_is_invisible(encdec):
  _, variables, fwd = encdec
  params = variables['params']
  logits = fwd(params, ENC, DEC_IN, DEC_TGT)
  # More encoder padding: identical logits (prompt-aware masks hide padding).
  # (Compared at real target positions; padded query rows attend to nothing.)
  padded = np.pad(ENC, ((0, 0), (0, 5)))
  real = DEC_TGT > 0
  np.testing.assert_allclose(
      np.asarray(fwd(params, padded, DEC_IN, DEC_TGT))[real],
      np.asarray(logits)[real],
      atol=1e-5,
      rtol=1e-5,
  )
  # A different prompt changes the logits.
  flat = params_lib.flatten_params(params)
  flat['encoder/prompt/prompt/prompt'] = flat['encoder/prompt/prompt/prompt'] + 1.0
  other = fwd(params_lib.unflatten_params(flat), ENC, DEC_IN, DEC_TGT)
  assert float(jnp.max(jnp.abs(other - logits))) > 1e-3


def test_decoder_cross_attends_to_prompt(encdec):
  """With all real encoder tokens masked out the decoder still sees the prompt."""
  model, variables, _ = encdec
  encoded = model.apply(variables, ENC, enable_dropout=False, method=model.encode)
  # Zero the encoded prompt positions: logits must change.
  dec = lambda e: model.apply(
      variables, e, ENC, DEC_IN, DEC_TGT, enable_dropout=False, method=model.decode
  )
  zeroed = encoded.at[:, :P].set(0.0)
  assert float(jnp.max(jnp.abs(dec(zeroed) - dec(encoded)))) > 1e-4


def _greedy_uncached(fwd, params, enc, steps, **kw):
  batch = enc.shape[0]
  out = np.zeros((batch, steps), np.int32)
  step_logits = []
  for t in range(steps):
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), out[:, :-1]], axis=1)
    dec_in[:, t + 1 :] = 0
    logits = np.asarray(fwd(params, enc, dec_in, np.ones_like(dec_in), **kw))
    out[:, t] = logits[:, t].argmax(-1)
    step_logits.append(logits[:, t])
  return out, np.stack(step_logits, axis=1)


def _greedy_cached(model, params, enc, steps, **kw):
  batch = enc.shape[0]
  ones = jnp.ones((batch, steps), jnp.int32)
  _, variables = model.apply(
      {'params': params},
      enc,
      ones,
      ones,
      enable_dropout=False,
      decode=True,
      max_decode_length=steps,
      mutable=['cache'],
      **kw,
  )
  cache = variables['cache']
  encoded = model.apply({'params': params}, enc, enable_dropout=False, method=model.encode, **kw)

  @jax.jit
  def step(cache, token):
    logits, new_vars = model.apply(
        {'params': params, 'cache': cache},
        encoded,
        enc,
        token,
        token,
        enable_dropout=False,
        decode=True,
        max_decode_length=steps,
        mutable=['cache'],
        method=model.decode,
    )
    return logits[:, -1], new_vars['cache']

  token = jnp.zeros((batch, 1), jnp.int32)
  out, step_logits = [], []
  for _ in range(steps):
    logits, cache = step(cache, token)
    token = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    out.append(np.asarray(token[:, 0]))
    step_logits.append(np.asarray(logits))
  return np.stack(out, axis=1), np.stack(step_logits, axis=1)


def test_cached_greedy_decode_equals_uncached(encdec):
  model, variables, fwd = encdec
  params = variables['params']
  steps = 5
  uncached, uncached_logits = _greedy_uncached(fwd, params, ENC, steps)
  cached, cached_logits = _greedy_cached(model, params, ENC, steps)
  np.testing.assert_array_equal(cached, uncached)
  np.testing.assert_allclose(cached_logits, uncached_logits, atol=1e-5, rtol=1e-5)


def test_suffix_prompt_model():
  model = prompted.PromptEncoderDecoder(CFG, prompt_length=P, combine=prompts.suffix_prompt)
  variables = model.init(jax.random.PRNGKey(1), ENC, DEC_IN, DEC_TGT, enable_dropout=False)
  fwd = jax.jit(functools.partial(_forward, model))
  logits = fwd(variables['params'], ENC, DEC_IN, DEC_TGT)
  padded = np.pad(ENC, ((0, 0), (0, 4)))
  real = DEC_TGT > 0
  np.testing.assert_allclose(
      np.asarray(fwd(variables['params'], padded, DEC_IN, DEC_TGT))[real],
      np.asarray(logits)[real],
      atol=1e-5,
      rtol=1e-5,
  )
  mask = np.asarray(model.apply(variables, ENC, method=model.encoder_input_mask))
  np.testing.assert_array_equal(mask[2], [True] * 5 + [False] * 4)


def test_bfloat16_activations_float32_prompt():
  cfg = t5.get_config('tiny', dtype='bfloat16')
  model = prompted.PromptEncoderDecoder(cfg, prompt_length=P)
  variables = jax.eval_shape(
      lambda r: model.init(r, ENC, DEC_IN, DEC_TGT, enable_dropout=False), jax.random.PRNGKey(0)
  )
  assert variables['params']['encoder']['prompt']['prompt']['prompt'].dtype == jnp.float32
  encoded = jax.eval_shape(
      lambda v: model.apply(v, ENC, enable_dropout=False, method=model.encode), variables
  )
  assert encoded.dtype == jnp.bfloat16 and encoded.shape == (3, P + 6, cfg.emb_dim)
  logits = jax.eval_shape(
      functools.partial(_forward, model), variables['params'], ENC, DEC_IN, DEC_TGT
  )
  assert logits.dtype == jnp.float32


def test_missing_prompt_length():
  with pytest.raises(ValueError, match='prompt_length'):
    prompted.PromptEncoderDecoder(CFG)


def test_packing_rejected(encdec):
  model, variables, _ = encdec
  seg = np.ones_like(ENC)
  with pytest.raises(ValueError, match='pack'):
    model.apply(
        variables,
        ENC,
        DEC_IN,
        DEC_TGT,
        encoder_segment_ids=seg,
        decoder_segment_ids=np.ones_like(DEC_IN),
        enable_dropout=False,
    )


# ---------------------------------------------------------------------------- prompt banks --


def test_prompt_bank_mixed_batch_equals_single_prompts():
  num_prompts = 3
  bank_model = prompted.PromptEncoderDecoder(CFG, prompt_length=P, num_prompts=num_prompts)
  ids = np.array([2, 0, 2], np.int32)
  variables = bank_model.init(
      jax.random.PRNGKey(0), ENC, DEC_IN, DEC_TGT, enable_dropout=False, prompt_ids=ids
  )
  bank = variables['params']['encoder']['prompt']['prompt']['prompt']
  assert bank.shape == (num_prompts, P, CFG.emb_dim)
  axes = variables['params_axes']['encoder']['prompt']['prompt']['prompt_axes']
  assert axes.names == ('tasks', 'prompt', 'prompt_embed')
  # Distinct prompts (each gets its own key).
  assert float(jnp.max(jnp.abs(bank[0] - bank[1]))) > 1e-3
  mixed = jax.jit(functools.partial(_forward, bank_model))(
      variables['params'], ENC, DEC_IN, DEC_TGT, prompt_ids=ids
  )
  assert mixed.shape == (3, 4, CFG.vocab_size)

  single = prompted.PromptEncoderDecoder(CFG, prompt_length=P)
  single_fwd = jax.jit(functools.partial(_forward, single))
  flat = params_lib.flatten_params(variables['params'])
  for b, k in enumerate(ids):
    flat_k = dict(flat)
    flat_k['encoder/prompt/prompt/prompt'] = bank[k]
    alone = single_fwd(
        params_lib.unflatten_params(flat_k), ENC[b : b + 1], DEC_IN[b : b + 1], DEC_TGT[b : b + 1]
    )
    np.testing.assert_allclose(
        np.asarray(mixed[b : b + 1]), np.asarray(alone), atol=1e-5, rtol=1e-5
    )
  with pytest.raises(ValueError, match='prompt_ids'):
    bank_model.apply(variables, ENC, DEC_IN, DEC_TGT, enable_dropout=False)


def test_prompt_bank_module_directly():
  bank = prompted.PromptBank(num_prompts=4, length=2, embed_dim=3, prompt_init=prompts.uniform(0.5))
  variables = bank.init(jax.random.PRNGKey(0), prompt_ids=np.array([0]))
  table = variables['params']['prompt']
  out = bank.apply(variables, prompt_ids=np.array([3, 1, 3]))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(table)[[3, 1, 3]])
  custom = prompted.PromptBank(
      num_prompts=2,
      length=2,
      embed_dim=3,
      bank_init=lambda rng, shape: jnp.arange(12.0).reshape(shape),
  )
  np.testing.assert_array_equal(
      np.asarray(custom.init(jax.random.PRNGKey(0))['params']['prompt']).ravel(), np.arange(12.0)
  )


def test_combined_prompt_hook():
  module = prompted.CombinedPrompt(
      prompt=prompts.Prompt(length=2, embed_dim=3), combine=prompts.suffix_prompt
  )
  tokens = np.array([[4, 1, 0], [5, 6, 1]])
  embedded = jnp.ones((2, 3, 3))
  variables = module.init(jax.random.PRNGKey(0), tokens, embedded)
  assert module.length == 2
  out = module.apply(variables, tokens, embedded)
  value = variables['params']['prompt']['prompt']
  assert out.shape == (2, 5, 3)
  np.testing.assert_array_equal(np.asarray(out[0, 2:4]), np.asarray(value))
  got = module.apply(variables, 2, method=module.get_prompt)
  np.testing.assert_array_equal(np.asarray(got), np.broadcast_to(value, (2, 2, 3)))
  mask = module.apply(variables, tokens, tokens > 0, method=module.combine_mask)
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


# ---------------------------------------------------------------------------- decoder-only --

LM_TOKENS = np.array([[0, 5, 6, 7, 8, 9], [0, 10, 11, 0, 0, 0]], np.int32)
LM_TARGETS = np.array([[5, 6, 7, 8, 9, 1], [10, 11, 1, 0, 0, 0]], np.int32)


@pytest.fixture(scope='module')
def lm():
  model = prompted.PromptDecoderOnly(CFG, prompt_length=P)
  variables = model.init(jax.random.PRNGKey(0), LM_TOKENS, LM_TARGETS, enable_dropout=False)
  return model, variables


def test_decoder_only_params_and_logits(lm):
  model, variables = lm
  prompt = variables['params']['decoder']['prompt']['prompt']['prompt']
  assert prompt.shape == (P, CFG.emb_dim)
  logits = model.apply(variables, LM_TOKENS, LM_TARGETS, enable_dropout=False)
  assert logits.shape == (2, LM_TOKENS.shape[1], CFG.vocab_size)
  # Identical to the backbone's P + L logits with the prompt positions sliced off.
  backbone = t5.DecoderOnly(CFG, prompt_factory=model.prompt_factory)
  full = backbone.apply(variables, LM_TOKENS, LM_TARGETS, enable_dropout=False)
  assert full.shape[1] == P + LM_TOKENS.shape[1]
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(full[:, P:]))


def test_decoder_only_cache_contains_prompt(lm):
  """Prefill the prompt, then feed tokens one by one: logits equal the full forward pass."""
  model, variables = lm
  params = variables['params']
  full = np.asarray(model.apply(variables, LM_TOKENS, LM_TARGETS, enable_dropout=False))
  batch, length = LM_TOKENS.shape
  max_len = P + length
  ones = jnp.ones((batch, length), jnp.int32)
  _, cache_vars = model.apply(
      {'params': params},
      ones,
      ones,
      enable_dropout=False,
      decode=True,
      max_decode_length=max_len,
      mutable=['cache'],
  )
  _, cache_vars = model.apply(
      {'params': params, 'cache': cache_vars['cache']},
      batch,
      max_len,
      method=model.prefill,
      mutable=['cache'],
  )
  cache = cache_vars['cache']

  @jax.jit
  def step(cache, token):
    logits, new_vars = model.apply(
        {'params': params, 'cache': cache},
        token,
        token,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_len,
        mutable=['cache'],
    )
    return logits[:, -1], new_vars['cache']

  for t in range(length):
    logits, cache = step(cache, jnp.asarray(LM_TOKENS[:, t : t + 1]))
    real = LM_TARGETS[:, t] > 0
    np.testing.assert_allclose(np.asarray(logits)[real], full[real, t], atol=1e-5, rtol=1e-5)


def test_decoder_only_prefix_lm(lm):
  model, variables = lm
  causal_attention = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], np.int32)
  logits = model.apply(
      variables,
      LM_TOKENS,
      LM_TARGETS,
      decoder_causal_attention=causal_attention,
      enable_dropout=False,
  )
  assert logits.shape == (2, LM_TOKENS.shape[1], CFG.vocab_size)
  causal = model.apply(variables, LM_TOKENS, LM_TARGETS, enable_dropout=False)
  # Bidirectional prefix changes the prefix positions' logits.
  assert float(jnp.max(jnp.abs(logits[:, :2] - causal[:, :2]))) > 1e-5


def test_decoder_only_remove_prompt_any_layout():
  model = prompted.PromptDecoderOnly(CFG, prompt_length=2, combine=prompts.prefix_prompt_after_bos)
  variables = model.init(jax.random.PRNGKey(0), LM_TOKENS, LM_TARGETS, enable_dropout=False)
  x = jnp.arange(2 * (2 + 6), dtype=jnp.float32).reshape(2, 8)
  out = model.apply(variables, LM_TOKENS, x, method=model.remove_prompt)
  np.testing.assert_array_equal(np.asarray(out), [[0, 3, 4, 5, 6, 7], [8, 11, 12, 13, 14, 15]])
  logits = model.apply(variables, LM_TOKENS, LM_TARGETS, enable_dropout=False)
  assert logits.shape == (2, 6, CFG.vocab_size)
