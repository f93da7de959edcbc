"""IA3 (`methods/ia3.py`) equals Hugging Face PEFT's `IA3Config` for T5 (loss and gradients).

PEFT scales the outputs of `k` and `v` of every attention and the input of `wo`; ours scales the
projected keys/values (`k_conv`/`v_conv`, `[heads, head_dim]`) and the MLP activations
(`intermediate_conv`, `[mlp]`), the original prompt-tuning code's parameters. The vectors are drawn
away from ones, set in PEFT, converted (`checkpoints/peft.py`); the gradients PEFT computes are
converted the same way (the mapping is a reshape) and must match ours within 1e-4.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')

import methods_testlib as lib  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import peft as peft_io  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import ia3  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def rig(tmp_path_factory):
  hf = lib.hf_model()
  config, params = lib.convert(hf, str(tmp_path_factory.mktemp('hf')))
  model = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(task_type='SEQ_2_SEQ_LM'))
  model.eval()
  torch.manual_seed(4)
  named = {n: p for n, p in model.named_parameters() if 'ia3_l' in n}
  with torch.no_grad():
    for p in named.values():
      p.copy_(1.0 + 0.5 * torch.randn_like(p))
  return config, params, model, named


def _to_ours(model, tensors, config):
  cfg = model.peft_config['default'].to_dict()
  return peft_io.adapter_from_state(cfg, tensors, config).params


def test_loss_and_gradients_match_peft(rig):
  config, params, model, named = rig
  enc, tgt = lib.batch()
  peft_loss, peft_grads = lib.peft_loss_and_grads(model, enc, tgt, named)
  saved = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  assert len(saved) == 8 * 2  # k, v of 3 attentions + wo, per layer pair: 4 + 4 per layer, L=2
  ours = _to_ours(model, saved, config)
  module = t5.EncoderDecoder(config, hooks=ia3.IA3Hooks())
  enc_, tgt_ = lib.batch()
  assert lib.method_param_shapes(module, enc_, tgt_, params) == {
      k: v.shape for k, v in ours.items()
  }
  loss, grads = lib.our_loss_and_grads(
      module, lib.with_method_params(params, ours), '.*/ia3_scaling.*', enc, tgt
  )
  np.testing.assert_allclose(loss, peft_loss, rtol=1e-5)
  # PEFT's gradients, named as saved, through the same conversion.
  grad_tensors = {
      n.replace('.default', '').replace('base_model.model.', 'base_model.model.'): g
      for n, g in peft_grads.items()
  }
  expected = _to_ours(model, grad_tensors, config)
  assert sorted(expected) == sorted(grads)
  for name in grads:
    lib.assert_close_grads(grads[name], expected[name], name)


def test_initial_vectors_are_ones_and_merging_gives_the_same_logits(rig):
  config, params, model, _ = rig
  enc, tgt = lib.batch(seed=3)
  module = t5.EncoderDecoder(config, hooks=ia3.IA3Hooks())
  full, init = lib.init_method_params(module, enc, tgt, params)
  assert init and all(np.array_equal(v, np.ones_like(v)) for v in init.values())
  np.testing.assert_array_equal(
      lib.logits(module, full, enc, tgt), lib.logits(t5.EncoderDecoder(config), params, enc, tgt)
  )
  saved = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  trained = lib.with_method_params(params, _to_ours(model, saved, config))
  hooked = lib.logits(module, trained, enc, tgt)
  merged = lib.logits(t5.EncoderDecoder(config), ia3.merge(trained), enc, tgt)
  np.testing.assert_allclose(merged, hooked, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(hooked, lib.peft_logits(model, enc, tgt), rtol=1e-4, atol=1e-4)
