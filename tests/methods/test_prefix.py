"""Prefix tuning (`methods/prefix.py`) against Hugging Face PEFT 0.21 and a float64 numpy oracle.

Which semantics: our default follows the paper (prefixes in the encoder's self-attention and the
decoder's self- and cross-attention). PEFT on T5 puts prefixes on the decoder's self-attention
only, from one table where decoder layer l reads entries (4l mod 2L, 4l+1 mod 2L) (methods.md §1).
So:

* PEFT is the oracle for `blocks=('self_attention',), stacks=('decoder',)`: without projection on
  L=2 (layers 0 and 1 share PEFT's entries 0 and 1, and PEFT's gradient of an entry is the sum of
  ours over the layers reading it), and with projection on L=3 (every entry used once: PEFT's last
  Linear is ours split by layer). Loss and every parameter's gradient agree within 1e-4.
* The paper's placement (all three attentions) is checked against `numpy_t5` in float64: the
  loss, and gradients by central differences.

Also: the projected prefix's artifact (the collapsed keys and values) gives the same logits
without the projection, and decoding with the KV cache equals full forward passes.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')

import numpy_t5  # pylint: disable=g-import-not-at-top
import methods_testlib as lib  # pylint: disable=g-import-not-at-top
from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
from prompt_tuning.methods import prefix  # pylint: disable=g-import-not-at-top

N, HIDDEN = 3, 16
D = lib.D_MODEL
PEFT_LIKE = dict(blocks=('self_attention',), stacks=('decoder',))


def _hooks(**kw):
  return prefix.PrefixHooks(num_prefix=N, num_heads=lib.HEADS, head_dim=lib.D_KV, **kw)


def _peft(hf, projection):
  import copy  # pylint: disable=g-import-not-at-top

  cfg = peft.PrefixTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM,
      num_virtual_tokens=N,
      prefix_projection=projection,
      encoder_hidden_size=HIDDEN,
  )
  torch.manual_seed(2)
  model = peft.get_peft_model(copy.deepcopy(hf), cfg)
  model.eval()
  return model, model.prompt_encoder['default']


def _entries(num_layers, layer):
  """PEFT's table entries (key, value) of decoder layer `layer`."""
  return (4 * layer) % (2 * num_layers), (4 * layer + 1) % (2 * num_layers)


def _site(layer):
  return f'decoder/layers_{layer}/self_attention/prefix/'


@pytest.fixture(scope='module')
def rig2(tmp_path_factory):
  hf = lib.hf_model(num_layers=2)
  return (hf,) + lib.convert(hf, str(tmp_path_factory.mktemp('hf2')))


@pytest.fixture(scope='module')
def rig3(tmp_path_factory):
  hf = lib.hf_model(num_layers=3, seed=3)
  return (hf,) + lib.convert(hf, str(tmp_path_factory.mktemp('hf3')))


def test_plain_prefix_matches_peft_with_its_layer_sharing(rig2):
  hf, config, params = rig2
  peft_model, encoder = _peft(hf, projection=False)
  table = encoder.embedding.weight
  enc, tgt = lib.batch()
  peft_loss, peft_grads = lib.peft_loss_and_grads(peft_model, enc, tgt, {'table': table})
  x = table.detach().numpy().reshape(N, 4, lib.HEADS, D // lib.HEADS)
  ours = {}
  for layer in range(2):
    k, v = _entries(2, layer)
    ours[_site(layer) + 'key'], ours[_site(layer) + 'value'] = x[:, k], x[:, v]
  assert _entries(2, 0) == _entries(2, 1) == (0, 1)  # PEFT's sharing on even depths
  module = t5.EncoderDecoder(config, hooks=_hooks(**PEFT_LIKE))
  assert lib.method_param_shapes(module, enc, tgt, params) == {k: v.shape for k, v in ours.items()}
  loss, grads = lib.our_loss_and_grads(
      module, lib.with_method_params(params, ours), '.*/prefix/.*', enc, tgt
  )
  np.testing.assert_allclose(loss, peft_loss, rtol=1e-5)
  expected = np.zeros_like(x)
  for layer in range(2):
    k, v = _entries(2, layer)
    expected[:, k] += grads[_site(layer) + 'key']
    expected[:, v] += grads[_site(layer) + 'value']
  theirs = peft_grads['table'].reshape(expected.shape)
  assert np.abs(theirs[:, 2:]).max() == 0  # PEFT's dead half of the table
  lib.assert_close_grads(expected, theirs, 'table')


def test_projected_prefix_matches_peft(rig3):
  hf, config, params = rig3
  peft_model, encoder = _peft(hf, projection=True)
  torch_params = {
      'embedding': encoder.embedding.weight,
      'w1': encoder.transform[0].weight,
      'b1': encoder.transform[0].bias,
      'w2': encoder.transform[2].weight,
      'b2': encoder.transform[2].bias,
  }
  enc, tgt = lib.batch(seed=1)
  peft_loss, peft_grads = lib.peft_loss_and_grads(peft_model, enc, tgt, torch_params)
  t = {k: v.detach().numpy() for k, v in torch_params.items()}
  rows = lambda e: slice(e * D, (e + 1) * D)
  ours = {
      'prefix_projection/embedding': t['embedding'],
      'prefix_projection/dense/kernel': t['w1'].T,
      'prefix_projection/dense/bias': t['b1'],
  }
  for layer in range(3):
    k, v = _entries(3, layer)
    ours[_site(layer) + 'dense/kernel'] = np.concatenate(
        [t['w2'][rows(k)].T, t['w2'][rows(v)].T], 1
    )
    ours[_site(layer) + 'dense/bias'] = np.concatenate([t['b2'][rows(k)], t['b2'][rows(v)]])
  assert sorted({e for l in range(3) for e in _entries(3, l)}) == list(range(6))
  module = t5.EncoderDecoder(
      config, hooks=_hooks(projection=True, projection_hidden=HIDDEN, **PEFT_LIKE)
  )
  assert lib.method_param_shapes(module, enc, tgt, params) == {k: v.shape for k, v in ours.items()}
  full = lib.with_method_params(params, ours)
  loss, grads = lib.our_loss_and_grads(module, full, '.*prefix.*', enc, tgt)
  np.testing.assert_allclose(loss, peft_loss, rtol=1e-5)
  lib.assert_close_grads(grads['prefix_projection/embedding'], peft_grads['embedding'], 'E')
  lib.assert_close_grads(grads['prefix_projection/dense/kernel'], peft_grads['w1'].T, 'W1')
  lib.assert_close_grads(grads['prefix_projection/dense/bias'], peft_grads['b1'], 'b1')
  w2 = np.zeros_like(peft_grads['w2'])
  b2 = np.zeros_like(peft_grads['b2'])
  for layer in range(3):
    k, v = _entries(3, layer)
    kernel, bias = grads[_site(layer) + 'dense/kernel'], grads[_site(layer) + 'dense/bias']
    w2[rows(k)], w2[rows(v)] = kernel[:, :D].T, kernel[:, D:].T
    b2[rows(k)], b2[rows(v)] = bias[:D], bias[D:]
  lib.assert_close_grads(w2, peft_grads['w2'], 'W2')
  lib.assert_close_grads(b2, peft_grads['b2'], 'b2')

  # The artifact: projected keys/values, loaded by the plain parameterisation, same logits.
  collapsed = prefix.export_prefix(None, full)
  assert sorted(collapsed) == sorted(_site(l) + n for l in range(3) for n in ('key', 'value'))
  plain = t5.EncoderDecoder(config, hooks=_hooks(**PEFT_LIKE))
  np.testing.assert_allclose(
      lib.logits(plain, lib.with_method_params(params, collapsed), enc, tgt),
      lib.logits(module, full, enc, tgt),
      atol=1e-5,
  )


def test_paper_placement_equals_numpy_float64(rig2):
  """Encoder self-, decoder self- and cross-attention prefixes: loss and gradients vs numpy."""
  _, config, params = rig2
  enc, tgt = lib.batch(seed=2)
  rng = np.random.RandomState(0)
  module = t5.EncoderDecoder(config, hooks=_hooks())
  shapes = lib.method_param_shapes(module, enc, tgt, params)
  assert sorted(shapes) == sorted(
      f'{s}/layers_{l}/{b}/prefix/{n}'
      for s, b in (
          ('encoder', 'attention'),
          ('decoder', 'self_attention'),
          ('decoder', 'encoder_decoder_attention'),
      )
      for l in range(2)
      for n in ('key', 'value')
  )
  ours = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  loss, grads = lib.our_loss_and_grads(
      module, lib.with_method_params(params, ours), '.*/prefix/.*', enc, tgt
  )
  ref = numpy_t5.NumpyT5(params, lib.HEADS)

  def np_loss(values):
    pre = {}
    for path, v in values.items():
      stack, layer, block = path.split('/')[:3]
      key = (stack, int(layer.split('_')[1]), block)
      pre.setdefault(key, [None, None])[path.endswith('/value')] = v
    enc_pre = {k: tuple(v) for k, v in pre.items() if k[0] == 'encoder'}
    dec_pre = {k: tuple(v) for k, v in pre.items() if k[0] == 'decoder'}
    return ref.loss(enc, tgt, prefixes=enc_pre, decoder_prefixes=dec_pre)

  np.testing.assert_allclose(loss, np_loss(ours), rtol=2e-5)
  for path in sorted(ours)[::3]:
    for index in [(0, 0, 0), (N - 1, 1, 3)]:

      def f(x, path=path):
        return np_loss(dict(ours, **{path: x}))

      fd = numpy_t5.finite_difference(f, ours[path], index)
      np.testing.assert_allclose(
          grads[path][index], fd, rtol=2e-3, atol=2e-5, err_msg=f'{path}{index}'
      )
