"""ATTEMPT (`prompt_tuning.methods.attempt`) against a float64 numpy transcription of the
max-pool -> down -> SiLU -> up -> LayerNorm -> softmax over max-pooled prompts -> mixture pipeline
on the tiny T5 (forward and gradient), with two target tasks sharing the attention module in one
batch; the per-example mixture weights reach the models' aux outputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import composed_testlib as lib
from prompt_tuning import prompts
from prompt_tuning.architectures import hooks
from prompt_tuning.architectures import t5
from prompt_tuning.methods import attempt
from prompt_tuning.runtime import models

H = lib.H
NUM_SOURCES, NUM_TARGETS, BOTTLENECK = 3, 3, 8  # target 2 has no example in the batch
TASK_IDS = np.array([0, 1, 1, 0, 1, 0], np.int32)


def ref_weights(
    p, enc, task_ids=TASK_IDS, temperature=None, include_target=True, pool_padding=False
):
  """The mixture weights a [B, t+1] of ATTEMPT's "sub" attention, in float64."""
  emb = np.asarray(lib.backbone_params()['token_embedder']['embedding'], np.float64)[enc]
  if pool_padding:
    pooled = emb.max(1)
  else:
    pooled = np.where((enc > 0)[..., None], emb, -np.inf).max(1)
  hidden = pooled @ p['attention/down_kernel']
  hidden = hidden / (1.0 + np.exp(-hidden))  # SiLU
  hidden = hidden @ p['attention/up_kernel']
  mean = hidden.mean(-1, keepdims=True)
  var = ((hidden - mean) ** 2).mean(-1, keepdims=True)
  z = (hidden - mean) / np.sqrt(var + 1e-5) * p['attention/norm_scale'] + p['attention/norm_bias']
  target = p['target_prompt'][task_ids]
  keys = [np.broadcast_to(s.max(0), z.shape) for s in p['source_prompts']]
  if include_target:
    keys.append(target.max(1))
  scores = np.stack([(k * z).sum(-1) for k in keys], axis=1)
  scores = scores / (temperature if temperature is not None else H * math.e)
  scores = scores - scores.max(1, keepdims=True)
  return np.exp(scores) / np.exp(scores).sum(1, keepdims=True)


def ref_attempt(p, enc, task_ids=TASK_IDS, **kwargs):
  """P_b = sum_j a_bj C_j + P_tgt[t_b]."""
  a = ref_weights(p, enc, task_ids, **kwargs)
  target = p['target_prompt'][task_ids]
  cands = [np.broadcast_to(s, target.shape) for s in p['source_prompts']]
  if a.shape[1] > len(cands):
    cands.append(target)
  return np.einsum('bj,jblh->blh', a, np.stack(cands)) + target


def _factory(**kwargs):
  kwargs.setdefault('num_targets', NUM_TARGETS)
  return attempt.attempt_prompt_factory(4, NUM_SOURCES, bottleneck=BOTTLENECK, **kwargs)


@pytest.fixture(scope='module')
def params():
  enc, _, _ = lib.batch()
  init = lib.init_prompt_params(_factory(), enc, {'task_ids': TASK_IDS})
  shapes = {k: v.shape for k, v in lib.params_lib.flatten_params(init).items()}
  assert shapes == {
      'source_prompts': (NUM_SOURCES, 4, H),
      'target_prompt': (NUM_TARGETS, 4, H),
      'attention/down_kernel': (H, BOTTLENECK),
      'attention/up_kernel': (BOTTLENECK, H),
      'attention/norm_scale': (H,),
      'attention/norm_bias': (H,),
  }
  p = lib.random_like(init, seed=6, scale=1.0)
  p['source_prompts'] = p['source_prompts'] * 4.0  # distinct sources: weights far from uniform
  return p


TRAINABLE = ['target_prompt', 'attention']


@pytest.mark.parametrize('temperature', [None, 3.0])
def test_forward_and_gradient_match_numpy(params, temperature):
  enc, dec, tgt = lib.batch()
  features = {'task_ids': TASK_IDS}
  grads = lib.check_against_reference(
      _factory(temperature=temperature),
      params,
      lambda p: ref_attempt(p, enc, temperature=temperature),
      features,
      trainable=TRAINABLE,
  )
  assert 'source_prompts' not in grads  # frozen
  assert all(np.abs(grads[k]).max() > 0 for k in grads if k != 'target_prompt')
  target = grads['target_prompt']
  assert np.abs(target[0]).max() > 0 and np.abs(target[1]).max() > 0
  assert np.all(target[2] == 0)


def test_without_target_candidate_and_with_padding_pooled(params):
  enc, dec, tgt = lib.batch()
  for kwargs in (dict(include_target=False), dict(pool_padding=True)):
    lib.check_against_reference(
        _factory(**kwargs),
        params,
        lambda p: ref_attempt(p, enc, **kwargs),
        {'task_ids': TASK_IDS},
        trainable=['attention'],
    )


def test_mixed_targets_alone_equal_and_weights_are_per_example(params):
  features = {'task_ids': TASK_IDS}
  lib.alone_equals_mixed(_factory(), params, features)
  enc, _, _ = lib.batch()
  # A low temperature, so that the weights are far from uniform on this tiny model (H * e = 87).
  module = t5.EncoderDecoder(lib.CFG, prompt_factory=_factory(temperature=1.0))
  _, sown = module.apply(
      {'params': lib.with_prompt_params(params)},
      enc,
      enable_dropout=False,
      method=module.encode,
      mutable=[hooks.PER_EXAMPLE_OUTPUTS],
      features={'task_ids': TASK_IDS},
  )
  weights = models.per_example_outputs(sown)[attempt.MIXTURE_WEIGHTS]
  flat = {k: np.asarray(v, np.float64) for k, v in lib.params_lib.flatten_params(params).items()}
  expected = ref_weights(flat, enc, temperature=1.0)
  np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5, atol=1e-6)
  assert np.allclose(np.asarray(weights).sum(1), 1.0, atol=1e-6)
  assert np.ptp(expected, axis=0).max() > 0.05  # the examples really mix differently


def test_sources_from_files_and_clear_errors(tmp_path):
  files = []
  for i in range(NUM_SOURCES):
    files.append(str(tmp_path / f'src{i}.npy'))
    np.save(files[-1], np.full((4, H), i, np.float32))
  load = attempt.stack_files(files)
  np.testing.assert_array_equal(load()[:, 0, 0], [0, 1, 2])
  enc, _, _ = lib.batch()
  init = lib.init_prompt_params(
      _factory(source_init=prompts.from_array(load)), enc, {'task_ids': TASK_IDS}
  )
  np.testing.assert_array_equal(init['source_prompts'], load())
  np.save(str(tmp_path / 'odd.npy'), np.zeros((5, H), np.float32))
  with pytest.raises(ValueError, match='differ in shape'):
    attempt.stack_files(files + [str(tmp_path / 'odd.npy')])()
  factory = _factory()
  module = factory()
  with pytest.raises(ValueError, match='needs the embedded inputs'):
    module.init(jax.random.PRNGKey(0), 2, method=module.get_prompt)
