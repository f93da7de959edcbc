"""LoRA (`methods/lora.py`) equals Hugging Face PEFT's `LoraConfig` for T5 (loss and gradients).

PEFT's default targets on T5 are `q` and `v` of every attention, cross-attention included; ours
too. PEFT's factors (`lora_A [r, in]`, `lora_B [out, r]`, both random so the update is not zero)
are converted (`checkpoints/peft.py`: `lora_a = A^T`, `lora_b = B^T`), and PEFT's gradients the
same way. Also: PEFT's initialization (A within +-1/sqrt(in), B zero), rsLoRA's scale, and that
merging the update into the kernels gives the same logits.
"""

import copy

import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')

import methods_testlib as lib  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import peft as peft_io  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import lora  # pylint: disable=g-import-not-at-top

R, ALPHA = 4, 6.0


@pytest.fixture(scope='module')
def rig(tmp_path_factory):
  hf = lib.hf_model()
  config, params = lib.convert(hf, str(tmp_path_factory.mktemp('hf')))
  torch.manual_seed(5)
  cfg = peft.LoraConfig(task_type='SEQ_2_SEQ_LM', r=R, lora_alpha=ALPHA, init_lora_weights=False)
  model = peft.get_peft_model(copy.deepcopy(hf), cfg)
  model.eval()
  named = {n: p for n, p in model.named_parameters() if 'lora_' in n}
  return config, params, model, named


def _adapter(model, tensors, config):
  return peft_io.adapter_from_state(model.peft_config['default'].to_dict(), tensors, config)


def test_loss_and_gradients_match_peft(rig):
  config, params, model, named = rig
  enc, tgt = lib.batch()
  peft_loss, peft_grads = lib.peft_loss_and_grads(model, enc, tgt, named)
  saved = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
  adapter = _adapter(model, saved, config)
  assert adapter.lora_scale == pytest.approx(ALPHA / R)
  assert len(adapter.params) == 12 * 2  # q and v of 3 attentions x 2 layers, A and B
  module = t5.EncoderDecoder(config, hooks=lora.LoraHooks(rank=R, alpha=ALPHA))
  assert lib.method_param_shapes(module, enc, tgt, params) == {
      k: v.shape for k, v in adapter.params.items()
  }
  full = lib.with_method_params(params, adapter.params)
  loss, grads = lib.our_loss_and_grads(module, full, '.*/lora/.*', enc, tgt)
  np.testing.assert_allclose(loss, peft_loss, rtol=1e-5)
  grad_tensors = {n.replace('.default', ''): g for n, g in peft_grads.items()}
  expected = _adapter(model, grad_tensors, config).params
  assert sorted(expected) == sorted(grads)
  for name in grads:
    lib.assert_close_grads(grads[name], expected[name], name)
  # Merged into the kernels: the same function.
  np.testing.assert_allclose(
      lib.logits(t5.EncoderDecoder(config), lora.merge(full, ALPHA / R), enc, tgt),
      lib.logits(module, full, enc, tgt),
      rtol=1e-4,
      atol=1e-4,
  )


def test_initialization_is_peft_s_and_starts_at_the_backbone(rig):
  config, params, _, _ = rig
  enc, tgt = lib.batch()
  module = t5.EncoderDecoder(
      config,
      hooks=lora.LoraHooks(
          rank=R, kernels=('query', 'value', 'wo'), blocks=lora.ATTENTION_BLOCKS + ('mlp',)
      ),
  )
  full, init = lib.init_method_params(module, enc, tgt, params)
  a = {k: v for k, v in init.items() if k.endswith('lora_a')}
  b = {k: v for k, v in init.items() if k.endswith('lora_b')}
  assert len(a) == len(b) == 2 * (3 * 2) + 2 * 2  # q, v of 3 attentions and wo, 2 layers
  for k, v in a.items():
    bound = 1.0 / np.sqrt(v.shape[0])
    assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound, k
  assert all(not v.any() for v in b.values())
  np.testing.assert_array_equal(
      lib.logits(module, full, enc, tgt), lib.logits(t5.EncoderDecoder(config), params, enc, tgt)
  )
  assert lora.scaling(16, 8.0) == 0.5 and lora.scaling(16, 8.0, use_rslora=True) == 2.0
  assert lora.LoraHooks(rank=8).scale == 1.0
