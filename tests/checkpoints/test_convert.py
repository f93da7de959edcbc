"""Tests for scripts/convert_checkpoint.py (Hugging Face <-> T5X legacy).

Round trip: a random tiny T5 written with `huggingface.save_t5` -> T5X ->
Hugging Face again must give bit-identical parameters, and the safetensors
files of both Hugging Face directories must hold identical tensors.
"""

import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from prompt_tuning import params as params_lib
from prompt_tuning.architectures import t5
from prompt_tuning.checkpoints import formats
from prompt_tuning.checkpoints import huggingface
from prompt_tuning.checkpoints import t5x_format

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, 'scripts', 'convert_checkpoint.py')


def _load_script():
  spec = importlib.util.spec_from_file_location('convert_checkpoint', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


convert_checkpoint = _load_script()


def assert_trees_bit_equal(a, b):
  fa, fb = params_lib.flatten_params(a), params_lib.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype)
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)


def shape_fields(config):
  names = (
      'vocab_size',
      'emb_dim',
      'num_heads',
      'head_dim',
      'mlp_dim',
      'num_encoder_layers',
      'num_decoder_layers',
      'logits_via_embedding',
      'relative_attention_num_buckets',
  )
  return {n: getattr(config, n) for n in names} | {'gated': len(config.mlp_activations) > 1}


def safetensors_state(directory):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  out = {}
  for f in sorted(glob.glob(os.path.join(directory, '*.safetensors'))):
    out.update(load_file(f))
  return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(config, numpy params, HF directory written by save_t5)."""
  import jax  # pylint: disable=g-import-not-at-top

  config = t5.get_config('tiny')
  params = t5.init_variables(config, jax.random.PRNGKey(3))['params']
  params = jax.tree_util.tree_map(np.asarray, params)
  hf_dir = str(tmp_path_factory.mktemp('convert') / 'hf_in')
  huggingface.save_t5(hf_dir, config, params)
  return config, params, hf_dir


@pytest.fixture(scope='module')
def round_trip(tiny):
  """HF -> T5X -> HF with the CLI's main(); returns the three paths."""
  _, _, hf_dir = tiny
  base = os.path.dirname(hf_dir)
  t5x_dir = os.path.join(base, 't5x', 'checkpoint_0')
  hf_out = os.path.join(base, 'hf_out')
  assert convert_checkpoint.main(['--input', hf_dir, '--output', t5x_dir, '--to', 't5x']) == 0
  assert (
      convert_checkpoint.main(['--input', t5x_dir, '--output', hf_out, '--to', 'huggingface']) == 0
  )
  return hf_dir, t5x_dir, hf_out


def test_hf_to_t5x_to_hf_identical(tiny, round_trip):
  config, params, _ = tiny
  hf_dir, t5x_dir, hf_out = round_trip
  assert formats.detect_format(hf_dir) == 'huggingface'
  assert formats.detect_format(t5x_dir) == 't5x'
  assert formats.detect_format(hf_out) == 'huggingface'
  # The T5X checkpoint holds exactly the original parameters.
  assert_trees_bit_equal(t5x_format.load(t5x_dir), params)
  assert_trees_bit_equal(formats.load_params(hf_dir), params)
  # Back in Hugging Face: same parameters, same config, same tensors on disk.
  config2, params2 = huggingface.load_t5(hf_out)
  assert_trees_bit_equal(params2, params)
  assert shape_fields(config2) == shape_fields(config)
  a, b = safetensors_state(hf_dir), safetensors_state(hf_out)
  assert a and sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not [e for e in os.listdir(os.path.dirname(hf_out)) if '.tmp-' in e]


def test_explicit_config_preset(tiny, round_trip, tmp_path):
  _, params, _ = tiny
  _, t5x_dir, _ = round_trip
  out = str(tmp_path / 'hf_tiny')
  assert (
      convert_checkpoint.main(
          ['--input', t5x_dir, '--output', out, '--to', 'huggingface', '--config', 'tiny']
      )
      == 0
  )
  _, params2 = huggingface.load_t5(out)
  assert_trees_bit_equal(params2, params)


def test_wrong_preset_is_refused(round_trip, tmp_path, capsys):
  _, t5x_dir, _ = round_trip
  out = str(tmp_path / 'bad')
  rc = convert_checkpoint.main(
      ['--input', t5x_dir, '--output', out, '--to', 'huggingface', '--config', 't5_1_1_base']
  )
  assert rc == 1
  err = capsys.readouterr().err
  assert "does not match preset 't5_1_1_base'" in err
  assert 'emb_dim: preset 768, checkpoint 32' in err
  assert not os.path.exists(out)


def test_infer_config_matches_preset(tiny):
  config, params, _ = tiny
  inferred = formats.infer_t5_config(params)
  assert shape_fields(inferred) == shape_fields(config)
  assert tuple(inferred.mlp_activations) == ('gelu', 'linear')
  # From shapes only (no array read), as listed by list_variables.
  assert shape_fields(
      formats.infer_t5_config({k: v.shape for k, v in params_lib.flatten_params(params).items()})
  ) == shape_fields(config)
  assert formats.infer_t5_config(params, 'tiny') == config
  # Without a relpos embedding the head split comes from head_dim.
  flat = {k: v.shape for k, v in params_lib.flatten_params(params).items() if 'relpos' not in k}
  c = formats.infer_t5_config(flat, head_dim=16)
  assert (c.num_heads, c.head_dim) == (2, 16)
  with pytest.raises(ValueError, match='no "token_embedder/embedding"'):
    formats.infer_t5_config({'decoder/x/kernel': (2, 2)})


def test_refuses_to_overwrite(round_trip, tmp_path, capsys):
  hf_dir, t5x_dir, _ = round_trip
  out = str(tmp_path / 'exists')
  os.makedirs(out)
  (tmp_path / 'exists' / 'keep.txt').write_text('precious')
  rc = convert_checkpoint.main(['--input', hf_dir, '--output', out, '--to', 't5x'])
  assert rc == 1
  assert 'already exists; refusing to overwrite' in capsys.readouterr().err
  assert os.listdir(out) == ['keep.txt']
  assert (
      convert_checkpoint.main(
          ['--input', hf_dir, '--output', out, '--to', 't5x', '--overwrite', '--step', '12']
      )
      == 0
  )
  assert 'keep.txt' not in os.listdir(out)
  full = t5x_format.load_t5x_checkpoint(out)
  assert int(full['state']['step']) == 12
  rc = convert_checkpoint.main(
      ['--input', t5x_dir, '--output', out, '--to', 'huggingface', '--overwrite']
  )
  assert rc == 0 and formats.detect_format(out) == 'huggingface'


def test_prompt_dropped_and_bf16(tiny, tmp_path):
  config, params, _ = tiny
  with_prompt = dict(params)
  with_prompt['encoder'] = dict(
      params['encoder'], prompt={'prompt': {'prompt': np.ones((3, config.emb_dim), np.float32)}}
  )
  src = t5x_format.save(str(tmp_path / 'checkpoint_77'), with_prompt, 77)
  t5x_bf16 = str(tmp_path / 'bf16' / 'checkpoint_77')
  assert (
      convert_checkpoint.main(
          ['--input', src, '--output', t5x_bf16, '--to', 't5x', '--dtype', 'bfloat16']
      )
      == 0
  )
  full = t5x_format.load_t5x_checkpoint(t5x_bf16)
  assert int(full['state']['step']) == 77  # Step carried over.
  assert full['target']['token_embedder']['embedding'].dtype.name == 'bfloat16'
  out = str(tmp_path / 'hf')
  assert convert_checkpoint.main(['--input', src, '--output', out, '--to', 'huggingface']) == 0
  _, params2 = huggingface.load_t5(out)
  assert_trees_bit_equal(params2, params)


def test_missing_input_and_orbax(tmp_path, capsys):
  rc = convert_checkpoint.main(
      ['--input', str(tmp_path / 'nope'), '--output', str(tmp_path / 'out'), '--to', 't5x']
  )
  assert rc == 1
  assert 'does not exist' in capsys.readouterr().err
  # An orbax checkpoint some other program wrote (no prompt_tuning_checkpoint.json): refused.
  ob = tmp_path / 'orbax' / 'state'
  ob.mkdir(parents=True)
  (ob / '_CHECKPOINT_METADATA').write_text('{}')
  rc = convert_checkpoint.main(
      ['--input', str(tmp_path / 'orbax'), '--output', str(tmp_path / 'out'), '--to', 't5x']
  )
  assert rc == 1
  err = capsys.readouterr().err
  assert 'orbax checkpoint without prompt_tuning_checkpoint.json' in err
  assert 'interrupted' in err and 'another program' in err  # The two causes, and what to do.
  assert not os.path.exists(tmp_path / 'out')


def test_our_orbax_checkpoint_converts(tiny, tmp_path):
  """A model-tuning checkpoint of the runtime (MODEL_DIR) -> T5X (same step) -> Hugging Face."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top

  config, params, _ = tiny
  model_dir = str(tmp_path / 'model')
  state = train_state.TrainState(
      step=jnp.asarray(40, jnp.int32),
      trainable=params,
      frozen={},
      opt_state={'v': jnp.zeros((2,), jnp.float32)},
  )
  checkpoints.save_checkpoint(model_dir, state)
  t5x_out = str(tmp_path / 't5x' / 'checkpoint_40')
  assert convert_checkpoint.main(['--input', model_dir, '--output', t5x_out, '--to', 't5x']) == 0
  assert_trees_bit_equal(t5x_format.load(t5x_out), params)
  assert t5x_format.read_step(t5x_out) == 40  # The step recorded by the runtime.
  hf_out = str(tmp_path / 'hf')
  assert (
      convert_checkpoint.main(
          ['--input', os.path.join(model_dir, 'checkpoint_40'), '--output', hf_out]
          + ['--to', 'huggingface']
      )
      == 0
  )
  config2, params2 = huggingface.load_t5(hf_out)
  assert_trees_bit_equal(params2, params)
  assert shape_fields(config2) == shape_fields(config)


def test_command_line(round_trip, tmp_path):
  hf_dir, _, _ = round_trip
  out = str(tmp_path / 'cli' / 'checkpoint_0')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, SCRIPT, '--input', hf_dir, '--output', out, '--to', 't5x'],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '[convert_checkpoint] input' in proc.stdout
  assert '[convert_checkpoint] done' in proc.stdout
  assert formats.detect_format(out) == 't5x'
