"""P-tuning (`methods/p_tuning.py`) equals Hugging Face PEFT's `PromptEncoder` (MLP and LSTM).

Same random tiny T5 1.1 in both, dropout 0. PEFT's network weights are copied into ours (torch
`Linear.weight` is `[out, in]`, our kernels `[in, out]`; torch's two LSTM biases are summed); then
the loss and the gradients of every network parameter must agree within 1e-4 relative.

Layout. We follow the paper (one embedding row per prompt position, encoder only), which is PEFT
with `num_transformer_submodules=1`. PEFT's seq2seq default allocates `2n` rows, prepends the
first `n` outputs and runs the LSTM over all `2n` (so the used prompt depends on rows nothing
else uses); `num_rows=2n` reproduces it, and is checked against PEFT's default as well.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')

import methods_testlib as lib  # pylint: disable=g-import-not-at-top
from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import p_tuning  # pylint: disable=g-import-not-at-top

P, HIDDEN = 4, 24
PREFIX = 'encoder/prompt/prompt/'


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  hf = lib.hf_model()
  config, params = lib.convert(hf, str(tmp_path_factory.mktemp('hf')))
  return hf, config, params


def _peft_model(hf, kind, submodules):
  import copy  # pylint: disable=g-import-not-at-top

  cfg = peft.PromptEncoderConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM,
      num_virtual_tokens=P,
      encoder_hidden_size=HIDDEN,
      encoder_reparameterization_type=kind.upper(),
      num_transformer_submodules=submodules,
  )
  torch.manual_seed(1)
  model = peft.get_peft_model(copy.deepcopy(hf), cfg)
  model.eval()
  return model


def _mapping(encoder, kind):
  """Our flat parameter name -> (torch parameter or tuple of them, transform)."""
  out = {PREFIX + 'embedding': ((encoder.embedding.weight,), lambda w: w)}
  t = lambda w: w.T
  heads = [0, 2, 4] if kind == 'mlp' else [0, 2]
  for i, j in enumerate(heads):
    out[PREFIX + f'dense_{i}/kernel'] = ((encoder.mlp_head[j].weight,), t)
    out[PREFIX + f'dense_{i}/bias'] = ((encoder.mlp_head[j].bias,), lambda b: b)
  if kind == 'lstm':
    lstm = encoder.lstm_head
    for layer in range(lstm.num_layers):
      for direction, suffix in (('forward', ''), ('backward', '_reverse')):
        name = f'{PREFIX}lstm/layers_{layer}_{direction}/'
        get = lambda n: getattr(lstm, f'{n}_l{layer}{suffix}')
        out[name + 'wi'] = ((get('weight_ih'),), t)
        out[name + 'wh'] = ((get('weight_hh'),), t)
        # Our one bias is torch's b_ih + b_hh (same gradient as each of them).
        out[name + 'bias'] = ((get('bias_ih'), get('bias_hh')), lambda a, b: a + b)
  return out


def _to_ours(transform, grad):
  """A torch gradient in our layout (the bias sum's gradient is each bias's gradient)."""
  n = transform.__code__.co_argcount
  return transform(*([grad] + [np.zeros_like(grad)] * (n - 1)))


@pytest.mark.parametrize('kind,submodules', [('mlp', 1), ('lstm', 1), ('lstm', 2), ('mlp', 2)])
def test_loss_and_network_gradients_match_peft(backbone, kind, submodules):
  hf, config, params = backbone
  peft_model = _peft_model(hf, kind, submodules)
  encoder = peft_model.prompt_encoder['default']
  mapping = _mapping(encoder, kind)
  enc, tgt = lib.batch()
  torch_params = {name: tensors[0] for name, (tensors, _) in mapping.items()}
  peft_loss, peft_grads = lib.peft_loss_and_grads(peft_model, enc, tgt, torch_params)

  ours = {
      name: fn(*[p.detach().numpy() for p in tensors]) for name, (tensors, fn) in mapping.items()
  }
  factory = p_tuning.prompt_factory(
      P, kind, hidden_size=HIDDEN, num_rows=P * submodules if submodules > 1 else None
  )
  module = prompted.PromptEncoderDecoder(config, prompt_factory=factory)
  shapes = lib.method_param_shapes(module, enc, tgt, params)
  # The same parameters as PEFT's network, no more.
  assert shapes == {name: value.shape for name, value in ours.items()}
  full = lib.with_method_params(params, ours)
  loss, grads = lib.our_loss_and_grads(module, full, '.*/prompt/.*', enc, tgt)

  np.testing.assert_allclose(loss, peft_loss, rtol=1e-5)
  assert sorted(grads) == sorted(ours)
  for name, (_, transform) in mapping.items():
    lib.assert_close_grads(grads[name], _to_ours(transform, peft_grads[name]), name)
  if submodules == 2 and kind == 'lstm':
    # The rows PEFT never prepends still shape the prompt through the backward LSTM direction.
    assert np.abs(grads[PREFIX + 'embedding'][P:]).max() > 0
