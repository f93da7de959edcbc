"""transformers T5 directories <-> flaxformer-named parameters (`checkpoints/huggingface.py`)."""

import functools
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_tuning.architectures import t5
from prompt_tuning.checkpoints import huggingface as hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

SIZES = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    decoder_start_token_id=0,
    eos_token_id=1,
    pad_token_id=0,
    dropout_rate=0.0,
)
ENC = np.array([[5, 9, 17, 33, 2, 41, 7, 1, 0, 0], [12, 3, 88, 1, 0, 0, 0, 0, 0, 0]], np.int32)
TGT = np.array([[6, 7, 8, 9, 1, 0], [19, 20, 1, 0, 0, 0]], np.int32)
DEC = np.concatenate([np.zeros((2, 1), np.int32), TGT[:, :-1]], axis=1)


def _build(kind, seed=0):
  """Random transformers T5 models in the three head layouts."""
  torch.manual_seed(seed)
  if kind == 't5_1_0':  # ReLU, tied + scaled logits
    cfg = transformers.T5Config(
        feed_forward_proj='relu', tie_word_embeddings=True, num_decoder_layers=3, **SIZES
    )
  else:  # gated GELU, unscaled logits
    cfg = transformers.T5Config(feed_forward_proj='gated-gelu', tie_word_embeddings=False, **SIZES)
  model = transformers.T5ForConditionalGeneration(cfg)
  if kind == 't5_1_1':  # separate lm_head (the T5 1.1 checkpoints)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * 0.3)
  # 't5_1_1_tied': transformers 5 ties lm_head to shared for every T5 (unscaled for T5 1.1).
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('layer_norm.weight'):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
  return model.eval()


def _torch_logits(model):
  with torch.no_grad():
    return model(
        input_ids=torch.tensor(ENC, dtype=torch.long),
        attention_mask=torch.tensor(ENC > 0, dtype=torch.long),
        decoder_input_ids=torch.tensor(DEC, dtype=torch.long),
    ).logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  model = t5.EncoderDecoder(cfg)
  return jax.jit(lambda p: model.apply({'params': p}, ENC, DEC, TGT, enable_dropout=False))


def _assert_logits_close(cfg, params, ref):
  ours = np.asarray(_forward(cfg)(jax.tree_util.tree_map(jnp.asarray, params)))
  assert np.abs(ours - ref)[TGT > 0].max() < 1e-4


def _assert_trees_equal(a, b):
  fa, fb = t5.flatten_params(a), t5.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """{kind: (model, directory written by save_pretrained, torch logits)}."""
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for kind in ('t5_1_0', 't5_1_1', 't5_1_1_tied'):
    model = _build(kind)
    path = str(root / kind)
    model.save_pretrained(path)
    out[kind] = (model, path, _torch_logits(model))
  return out


@pytest.mark.parametrize('kind', ['t5_1_0', 't5_1_1', 't5_1_1_tied'])
def test_load_save_pretrained_dirs(saved, kind):
  model, path, ref = saved[kind]
  cfg, params = hf.load_t5(path)
  keys = load_file(os.path.join(path, 'model.safetensors')).keys()
  shared = model.shared.weight.detach().numpy()
  if kind == 't5_1_0':
    assert cfg.logits_via_embedding and cfg.mlp_activations == ('relu',)
    assert cfg.num_decoder_layers == 3 and 'logits_dense' not in params['decoder']
  else:
    assert not cfg.logits_via_embedding and cfg.mlp_activations == ('gelu', 'linear')
    kernel = params['decoder']['logits_dense']['kernel']
    if kind == 't5_1_1_tied':
      assert 'lm_head.weight' not in keys
      np.testing.assert_array_equal(kernel, shared.T)
    else:
      assert 'lm_head.weight' in keys
      np.testing.assert_array_equal(kernel, model.lm_head.weight.detach().numpy().T)
  np.testing.assert_array_equal(params['token_embedder']['embedding'], shared)
  np.testing.assert_array_equal(
      params['encoder']['relpos_bias']['rel_embedding'],
      model.encoder.block[0]
      .layer[0]
      .SelfAttention.relative_attention_bias.weight.detach()
      .numpy()
      .T,
  )
  np.testing.assert_array_equal(
      params['decoder']['layers_1']['encoder_decoder_attention']['query']['kernel'],
      model.decoder.block[1].layer[1].EncDecAttention.q.weight.detach().numpy().T,
  )
  assert cfg.dtype == 'float32'
  _assert_logits_close(cfg, params, ref)


def test_old_transformers_layout(saved, tmp_path):
  """transformers < 5 wrote `tie_word_embeddings: false` and a separate lm_head.weight."""
  model, path, ref = saved['t5_1_1']
  old = str(tmp_path / 'old')
  os.makedirs(old)
  with open(os.path.join(path, 'config.json')) as f:
    config = json.load(f)
  for key in ('scale_decoder_outputs', 'is_gated_act', 'dense_act_fn'):
    config.pop(key, None)
  config['tie_word_embeddings'] = False
  with open(os.path.join(old, 'config.json'), 'w') as f:
    json.dump(config, f)
  tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  tensors['encoder.embed_tokens.weight'] = tensors['shared.weight'].copy()
  tensors['decoder.embed_tokens.weight'] = tensors['shared.weight'].copy()
  save_file(tensors, os.path.join(old, 'model.safetensors'), metadata={'format': 'pt'})
  cfg, params = hf.load_t5(old)
  assert not cfg.logits_via_embedding
  _assert_logits_close(cfg, params, ref)
  # The same directory seen by transformers itself gives the same logits.
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(old).eval()
  assert np.abs(_torch_logits(reloaded) - ref).max() < 1e-5


def test_sharded_safetensors_and_pytorch_bin(saved, tmp_path, monkeypatch):
  model, path, _ = saved['t5_1_1']
  _, reference = hf.load_t5(path)
  sharded = str(tmp_path / 'sharded')
  model.save_pretrained(sharded, max_shard_size='20KB')
  assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json'))
  assert not os.path.exists(os.path.join(sharded, 'model.safetensors'))
  _assert_trees_equal(hf.load_t5(sharded)[1], reference)

  binary = str(tmp_path / 'bin')
  os.makedirs(binary)
  shutil.copy(os.path.join(path, 'config.json'), binary)
  torch.save(model.state_dict(), os.path.join(binary, 'pytorch_model.bin'))
  _assert_trees_equal(hf.load_t5(binary)[1], reference)

  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails
  with pytest.raises(ImportError, match='pip install torch'):
    hf.load_t5(binary)


def test_bfloat16_safetensors(saved, tmp_path):
  model, path, _ = saved['t5_1_1']
  _, reference = hf.load_t5(path)
  half = str(tmp_path / 'bf16')
  transformers.T5ForConditionalGeneration.from_pretrained(
      path, dtype=torch.bfloat16
  ).save_pretrained(half)
  _, params = hf.load_t5(half)
  for k, v in t5.flatten_params(params).items():
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, t5.flatten_params(reference)[k], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize('variant', ['t5_1_0', 't5_1_1'])
def test_round_trip_ours(variant, tmp_path):
  if variant == 't5_1_0':
    cfg = t5.get_config(
        'tiny',
        mlp_activations=('relu',),
        logits_via_embedding=True,
        num_decoder_layers=3,
        vocab_size=96,
    )
  else:
    cfg = t5.get_config('tiny', vocab_size=96)
  abstract = t5.init_variables(cfg, abstract=True)['params']
  rng = np.random.default_rng(7)
  params = jax.tree_util.tree_map(
      lambda x: rng.normal(0, 0.5, x.shape).astype(np.float32), abstract
  )
  path = str(tmp_path / variant)
  hf.save_t5(path, cfg, params)
  loaded_cfg, loaded = hf.load_t5(path, dropout_rate=cfg.dropout_rate)
  assert loaded_cfg == cfg
  _assert_trees_equal(loaded, params)
  # transformers reads the directory back to the same logits.
  model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  _assert_logits_close(cfg, params, _torch_logits(model))


def test_mismatching_config_raises_clear_error(saved):
  _, path, _ = saved['t5_1_1']
  wrong_size = t5.get_config('tiny', vocab_size=96, emb_dim=48)
  with pytest.raises(ValueError) as e:
    hf.load_t5(path, config=wrong_size)
  msg = str(e.value)
  assert 'token_embedder/embedding' in msg and '(96, 48)' in msg and '(96, 32)' in msg
  assert path in msg and 'size' in msg
  with pytest.raises(ValueError) as e:
    hf.load_t5(
        path, config=t5.get_config('tiny', vocab_size=128, num_heads=4, head_dim=8, mlp_dim=48)
    )
  assert 'NUM_EMBEDDINGS' in str(e.value) and '(128, 32)' in str(e.value)
  with pytest.raises(ValueError) as e:
    hf.load_t5(
        path,
        config=t5.get_config(
            'tiny', vocab_size=96, mlp_dim=48, mlp_activations=('relu',), logits_via_embedding=True
        ),
    )
  assert 'T5 1.0 vs 1.1' in str(e.value)


def test_config_from_hf_rules():
  base = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12)
  cfg = hf.config_from_hf(dict(base, feed_forward_proj='gated-gelu', tie_word_embeddings=False))
  assert cfg == t5.get_config('t5_1_1_base', dtype='float32', dropout_rate=0.1)
  cfg = hf.config_from_hf(
      dict(base, d_ff=3072, feed_forward_proj='relu'), dtype='bfloat16', dropout_rate=0.0
  )
  assert cfg == t5.get_config('t5_1_0_base')
  # transformers 5: tie_word_embeddings is always true, scale_decoder_outputs decides.
  cfg = hf.config_from_hf(
      dict(
          base,
          feed_forward_proj='gated-gelu',
          tie_word_embeddings=True,
          scale_decoder_outputs=False,
      )
  )
  assert not cfg.logits_via_embedding
  assert hf.config_from_hf(dict(base, feed_forward_proj='gelu')).mlp_activations == ('gelu_exact',)
  assert hf.config_to_hf(t5.get_config('t5_1_1_xl'))['feed_forward_proj'] == 'gated-gelu'
  with pytest.raises(ValueError, match='model_type'):
    hf.config_from_hf(dict(base, model_type='umt5'))
