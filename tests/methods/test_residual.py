"""Residual prompt tuning (`methods/residual.py`) against a float64 numpy transcription.

`P' = LN(W2 relu(W1 P + b1) + b2) + P` row by row (torch LayerNorm: biased variance, eps 1e-5),
prepended to the encoder inputs; the loss through the numpy T5 within 2e-5, and the gradients of
the embedding, the MLP and the LayerNorm by central differences within 2e-3. The saved artifact is
`P'`: a plain prompt model with it gives the same logits.
"""

import numpy as np
import pytest

import methods_testlib as lib
import numpy_t5
from prompt_tuning.architectures import prompted
from prompt_tuning.methods import artifacts
from prompt_tuning.methods import residual

P, BOTTLENECK = 3, 12
CFG = lib.tiny_config()
PRE = 'encoder/prompt/prompt/'


def residual_prompt(v, num_blocks=1):
  """float64 numpy: the paper's formula."""
  p = v[PRE + 'embedding']
  x = p
  for _ in range(num_blocks):
    h = np.maximum(x @ v[PRE + 'dense_0/kernel'] + v[PRE + 'dense_0/bias'], 0.0)
    y = h @ v[PRE + 'dense_1/kernel'] + v[PRE + 'dense_1/bias']
    mean = y.mean(-1, keepdims=True)
    var = ((y - mean) ** 2).mean(-1, keepdims=True)
    x = (y - mean) / np.sqrt(var + 1e-5) * v[PRE + 'layer_norm/scale'] + v[PRE + 'layer_norm/bias']
  return x + p


@pytest.mark.parametrize('num_blocks', [1, 2])
def test_loss_and_gradients_equal_numpy(num_blocks):
  base = lib.random_backbone(CFG, seed=4)
  enc, tgt = lib.batch()
  factory = residual.prompt_factory(P, bottleneck=BOTTLENECK, num_blocks=num_blocks)
  module = prompted.PromptEncoderDecoder(CFG, prompt_factory=factory)
  shapes = lib.method_param_shapes(module, enc, tgt, base)
  assert sorted(shapes) == sorted(
      PRE + n
      for n in (
          'embedding',
          'dense_0/kernel',
          'dense_0/bias',
          'dense_1/kernel',
          'dense_1/bias',
          'layer_norm/scale',
          'layer_norm/bias',
      )
  )
  rng = np.random.RandomState(5)
  ours = {
      k: (rng.normal(size=s) * 0.5 + (1.0 if k.endswith('scale') else 0.0)).astype(np.float32)
      for k, s in shapes.items()
  }
  full = lib.with_method_params(base, ours)
  loss, grads = lib.our_loss_and_grads(module, full, '.*/prompt/.*', enc, tgt)
  ref = numpy_t5.NumpyT5(base, CFG.num_heads)
  np_loss = lambda v: ref.loss(enc, tgt, prompt=residual_prompt(v, num_blocks))
  np.testing.assert_allclose(loss, np_loss(ours), rtol=2e-5)
  for path in ours:
    index = (1,) * len(shapes[path])
    fd = numpy_t5.finite_difference(
        lambda x, p=path: np_loss(dict(ours, **{p: x})), ours[path], index
    )
    np.testing.assert_allclose(grads[path][index], fd, rtol=2e-3, atol=2e-5, err_msg=path)

  # The artifact is P': the plain prompt of prompt tuning, no MLP.
  class Model:  # what export functions get: the runtime model (only `.module` is used)
    pass

  model = Model()
  model.module = module
  exported = artifacts.export_prompt_output(model, full)
  np.testing.assert_allclose(
      np.asarray(exported[artifacts.PROMPT_PATH]),
      residual_prompt(ours, num_blocks),
      rtol=1e-4,
      atol=1e-5,
  )
  plain = prompted.PromptEncoderDecoder(CFG, prompt_length=P)
  np.testing.assert_allclose(
      lib.logits(plain, lib.with_method_params(base, exported), enc, tgt),
      lib.logits(module, full, enc, tgt),
      atol=1e-5,
  )
