"""Per-layer prompts (`methods/per_layer.py`) against a float64 numpy transcription of the formula.

The oracle (`numpy_t5`) prepends the input prompt, and at the start of every encoder layer i
replaces (or adds to) the hidden states at the prompt positions with layer i's prompt, then runs
the plain T5 layer, as the original `per_layer.PromptEncoderLayer` does. Loss within 2e-5 and
gradients (central differences in float64) within 2e-3. With `replace` the input prompt has no
effect and no gradient; a bank of per-layer prompts serves mixed-task batches.
"""

import numpy as np
import pytest

import methods_testlib as lib
import numpy_t5
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import per_layer

P = 3
CFG = lib.tiny_config()


@pytest.fixture(scope='module')
def base():
  return lib.random_backbone(CFG, seed=1)


def _layer_paths():
  return [f'encoder/layers_{i}/prompt/prompt/prompt' for i in range(CFG.num_encoder_layers)]


@pytest.mark.parametrize('mode', ['replace', 'add'])
def test_loss_and_gradients_equal_numpy(base, mode):
  enc, tgt = lib.batch()
  module = prompted.PromptEncoderDecoder(
      CFG, prompt_length=P, hooks=per_layer.PerLayerPromptHooks(length=P, mode=mode)
  )
  shapes = lib.method_param_shapes(module, enc, tgt, base)
  assert sorted(shapes) == sorted(['encoder/prompt/prompt/prompt'] + _layer_paths())
  rng = np.random.RandomState(2)
  ours = {k: rng.uniform(-0.5, 0.5, size=s).astype(np.float32) for k, s in shapes.items()}
  loss, grads = lib.our_loss_and_grads(
      module, lib.with_method_params(base, ours), '.*/prompt/.*', enc, tgt
  )
  ref = numpy_t5.NumpyT5(base, CFG.num_heads)

  def np_loss(values):
    layer_prompts = [values[p] for p in _layer_paths()]

    def layer_input(i, x, prompt_mask):
      value = np.zeros_like(x)
      value[:, :P] = layer_prompts[i]  # prompt at the front: positions 0..P-1
      if mode == 'replace':
        return np.where(prompt_mask[..., None], value, x)
      return x + np.where(prompt_mask[..., None], value, 0.0)

    return ref.loss(
        enc, tgt, prompt=values['encoder/prompt/prompt/prompt'], layer_input=layer_input
    )

  np.testing.assert_allclose(loss, np_loss(ours), rtol=2e-5)
  for path in ours:
    for index in [(0, 0), (P - 1, 7)]:
      fd = numpy_t5.finite_difference(
          lambda x, p=path: np_loss(dict(ours, **{p: x})), ours[path], index
      )
      np.testing.assert_allclose(
          grads[path][index], fd, rtol=2e-3, atol=2e-5, err_msg=f'{path}{index}'
      )
  input_grad = np.abs(grads['encoder/prompt/prompt/prompt']).max()
  if mode == 'replace':
    # The layer-0 prompt overwrites the input prompt (the original's semantics).
    assert input_grad == 0
  else:
    assert input_grad > 1e-4


def test_a_bank_of_layer_prompts_serves_mixed_batches(base):
  enc, tgt = lib.batch()
  hooks = per_layer.PerLayerPromptHooks(length=P, num_prompts=2)
  module = prompted.PromptEncoderDecoder(CFG, prompt_length=P, num_prompts=2, hooks=hooks)
  shapes = lib.method_param_shapes(module, enc, tgt, base)
  assert shapes[_layer_paths()[0]] == (2, P, CFG.emb_dim)
  rng = np.random.RandomState(3)
  params = lib.with_method_params(
      base, {k: rng.uniform(-0.5, 0.5, size=s) for k, s in shapes.items()}
  )
  import jax  # pylint: disable=g-import-not-at-top

  apply = jax.jit(
      lambda p, e, ids: module.apply(
          {'params': p},
          e,
          lib.decoder_inputs(tgt).astype(np.int32),
          tgt.astype(np.int32),
          enable_dropout=False,
          prompt_ids=ids,
      )
  )
  ids = np.array([0, 1, 1], np.int32)
  mixed = np.asarray(apply(params, enc.astype(np.int32), ids))
  for prompt_id in (0, 1):
    alone = np.asarray(apply(params, enc.astype(np.int32), np.full(3, prompt_id, np.int32)))
    rows = ids == prompt_id
    np.testing.assert_allclose(mixed[rows], alone[rows], rtol=1e-5, atol=1e-5)
  assert (
      np.abs(
          mixed[0] - np.asarray(apply(params, enc.astype(np.int32), np.ones(3, np.int32)))[0]
      ).max()
      > 1e-3
  )
