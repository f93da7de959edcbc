"""Tests for prompt_tuning.checkpoints.formats (the one reader) and .orbax_format.

Our orbax checkpoints are written the way training writes them, with
`runtime.checkpoints.save_checkpoint` on a small TrainState, and what is read back is compared
with the arrays that were saved.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from prompt_tuning import params as params_lib
from prompt_tuning.architectures import t5
from prompt_tuning.checkpoints import formats
from prompt_tuning.checkpoints import huggingface
from prompt_tuning.checkpoints import orbax_format
from prompt_tuning.checkpoints import t5x_format
from prompt_tuning.runtime import checkpoints
from prompt_tuning.runtime import train_state

PROMPT = 'encoder/prompt/prompt/prompt'


def trainable_tree(value):
  """A model-tuning-like trainable tree whose arrays all start with `value`."""
  rng = np.random.RandomState(int(value))
  return {
      'token_embedder': {'embedding': rng.normal(size=(11, 4)).astype(np.float32) + value},
      'encoder': {
          'prompt': {'prompt': {'prompt': np.full((3, 4), value, np.float32)}},
          'layers_0': {'mlp': {'wi': {'kernel': rng.normal(size=(4, 6)).astype(np.float32)}}},
      },
  }


def save_ours(model_dir, step, trainable):
  state = train_state.TrainState(
      step=jnp.asarray(step, jnp.int32),
      trainable=jax.tree_util.tree_map(jnp.asarray, trainable),
      frozen={},
      opt_state={'param_states': {'v': jnp.full((5,), 7.0, jnp.float32)}},
  )
  return checkpoints.save_checkpoint(model_dir, state)


def assert_trees_bit_equal(a, b):
  fa, fb = params_lib.flatten_params(a), params_lib.flatten_params(b)
  assert list(sorted(fa)) == list(sorted(fb))
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype)
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=k)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  """MODEL_DIR with our checkpoints of steps 10 and 20."""
  d = str(tmp_path_factory.mktemp('formats') / 'model')
  save_ours(d, 10, trainable_tree(10))
  save_ours(d, 20, trainable_tree(20))
  return d


# ----------------------------------------------------------------------------
# Our orbax checkpoints through load_params.
# ----------------------------------------------------------------------------


def test_load_params_of_our_checkpoint_by_path_and_model_dir(model_dir):
  path = os.path.join(model_dir, 'checkpoint_10')
  assert formats.detect_format(path) == 'orbax'
  assert_trees_bit_equal(formats.load_params(path), trainable_tree(10))
  # MODEL_DIR stands for its latest complete checkpoint.
  ckpt = formats.resolve(model_dir)
  assert ckpt.path == os.path.join(model_dir, 'checkpoint_20') and ckpt.format == 'orbax'
  assert ckpt.is_ours and ckpt.requested == model_dir
  assert_trees_bit_equal(formats.load_params(model_dir), trainable_tree(20))
  assert formats.read_step(model_dir) == 20 and formats.read_step(path) == 10


def test_load_params_selects_variables(model_dir):
  truth = params_lib.flatten_params(trainable_tree(20))
  out = params_lib.flatten_params(formats.load_params(model_dir, variables=[PROMPT]))
  assert list(out) == [PROMPT]
  np.testing.assert_array_equal(out[PROMPT], truth[PROMPT])
  # A subtree prefix, a regex, and T5X's optional 'target/' prefix.
  assert sorted(params_lib.flatten_params(formats.load_params(model_dir, 'encoder'))) == [
      'encoder/layers_0/mlp/wi/kernel',
      PROMPT,
  ]
  assert list(params_lib.flatten_params(formats.load_params(model_dir, ['.*/wi/kernel']))) == [
      'encoder/layers_0/mlp/wi/kernel'
  ]
  out = params_lib.flatten_params(
      formats.load_params(model_dir, ['target/token_embedder/embedding'])
  )
  np.testing.assert_array_equal(out['token_embedder/embedding'], truth['token_embedder/embedding'])
  assert formats.load_params(model_dir, []) == {}
  with pytest.raises(t5x_format.UnknownVariableError, match=r"'encoder/prompt/prompt/promt'.*"):
    formats.load_params(model_dir, ['encoder/prompt/prompt/promt'])
  try:
    formats.load_params(model_dir, ['encoder/prompt/prompt/promt'])
  except KeyError as e:  # A KeyError (prompts.t5x_load's contract) naming the close match.
    assert PROMPT in str(e)
  out = formats.load_params(model_dir, [PROMPT, 'decoder/missing'], missing_ok=True)
  assert list(params_lib.flatten_params(out)) == [PROMPT]


def test_load_params_dtype(model_dir):
  out = params_lib.flatten_params(formats.load_params(model_dir, dtype=ml_dtypes.bfloat16))
  truth = params_lib.flatten_params(trainable_tree(20))
  for name, value in out.items():
    assert value.dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(value, truth[name].astype(ml_dtypes.bfloat16))


def test_orbax_reads_only_the_selected_arrays(model_dir, monkeypatch):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  requested = []
  real_restore = ocp.PyTreeCheckpointer.restore

  def spy(self, directory, *args, **kwargs):
    requested.append(kwargs['args'].item)
    return real_restore(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'restore', spy)
  formats.load_params(model_dir, [PROMPT])
  # Only the selected parameter was asked of orbax: no other parameter, no optimizer state.
  assert [params_lib.flatten_params(item) for item in requested] == [{'trainable/' + PROMPT: 0}]


def test_incomplete_and_foreign_orbax_checkpoints(model_dir, tmp_path):
  work = str(tmp_path / 'model')
  shutil.copytree(model_dir, work)
  # Killed after orbax wrote its files, before the commit: no metadata file.
  shutil.copytree(os.path.join(work, 'checkpoint_20'), os.path.join(work, 'checkpoint_30'))
  os.remove(os.path.join(work, 'checkpoint_30', orbax_format.METADATA_FILE))
  shutil.copytree(os.path.join(work, 'checkpoint_20'), os.path.join(work, 'checkpoint_40.tmp'))
  assert formats.resolve(work).path == os.path.join(work, 'checkpoint_20')  # Not 30, not 40.
  with pytest.raises(orbax_format.IncompleteCheckpointError) as e:
    formats.load_params(os.path.join(work, 'checkpoint_30'))
  assert 'orbax checkpoint without prompt_tuning_checkpoint.json' in str(e.value)
  assert 'interrupted' in str(e.value) and 'earlier complete checkpoint_<step>' in str(e.value)
  with pytest.raises(ValueError, match='unfinished'):
    formats.load_params(os.path.join(work, 'checkpoint_40.tmp'))
  # A model directory with nothing complete: the error lists what was ignored.
  for step in (10, 20):
    shutil.rmtree(os.path.join(work, f'checkpoint_{step}'))
  with pytest.raises(ValueError, match='Cannot detect') as e:
    formats.load_params(work)
  assert 'checkpoint_30' in str(e.value) and 'checkpoint_40.tmp' in str(e.value)
  assert orbax_format.METADATA_FILE in str(e.value)


def test_model_dir_with_t5x_and_our_checkpoints_picks_the_latest(tmp_path):
  d = str(tmp_path / 'mixed')
  save_ours(d, 10, trainable_tree(10))
  t5x_format.save(os.path.join(d, 'checkpoint_15'), trainable_tree(15), 15)
  assert formats.resolve(d).format == 't5x' and formats.read_step(d) == 15
  assert_trees_bit_equal(formats.load_params(d), trainable_tree(15))
  save_ours(d, 30, trainable_tree(30))
  assert formats.resolve(d).format == 'orbax' and formats.read_step(d) == 30
  assert_trees_bit_equal(formats.load_params(d), trainable_tree(30))


def test_saving_a_step_again_replaces_it_and_leaves_nothing_behind(tmp_path):
  d = str(tmp_path / 'model')
  save_ours(d, 20, trainable_tree(20))
  os.makedirs(os.path.join(d, 'checkpoint_20.old-123'))  # Left by a replacement that was killed.
  save_ours(d, 20, trainable_tree(21))
  assert_trees_bit_equal(formats.load_params(d), trainable_tree(21))
  assert sorted(os.listdir(d)) == ['checkpoint_20', 'numpy_checkpoints']
  np.testing.assert_array_equal(
      np.load(
          os.path.join(d, 'numpy_checkpoints', 'checkpoint_20', PROMPT.replace('/', '.') + '.npy')
      ),
      np.full((3, 4), 21, np.float32),
  )


# ----------------------------------------------------------------------------
# Detection happens once.
# ----------------------------------------------------------------------------


def _count(monkeypatch, module, name):
  calls = []
  real = getattr(module, name)

  def counted(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, counted)
  return calls


def test_format_detected_once_per_read(model_dir, tmp_path, monkeypatch):
  t5x_dir = t5x_format.save(str(tmp_path / 'checkpoint_3'), trainable_tree(3), 3)
  resolved = _count(monkeypatch, formats, 'resolve')
  detected = _count(monkeypatch, formats, '_detect_dir')
  peeked = _count(monkeypatch, t5x_format, 'peek_top_level_keys')
  formats.load_params(t5x_dir, [PROMPT])
  assert (len(resolved), len(detected), len(peeked)) == (1, 1, 1)
  del resolved[:], detected[:], peeked[:]
  formats.load_params(os.path.join(model_dir, 'checkpoint_10'), [PROMPT])
  assert (len(resolved), len(detected)) == (1, 1)
  del resolved[:], detected[:]
  # The runtime's initial-weights path goes through the same single detection.
  flat = checkpoints.load_checkpoint_params(model_dir, [PROMPT, 'decoder/not_there'])
  assert list(flat) == [PROMPT] and len(resolved) == 1
  np.testing.assert_array_equal(flat[PROMPT], np.full((3, 4), 20, np.float32))
  del resolved[:]
  assert checkpoints.checkpoint_step(model_dir) == 20 and len(resolved) == 1


# ----------------------------------------------------------------------------
# Hugging Face directories through load_params; atomic save_t5.
# ----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  config = t5.get_config('tiny')
  params = jax.tree_util.tree_map(np.asarray, t5.init_variables(config)['params'])
  d = str(tmp_path_factory.mktemp('hf') / 'tiny')
  huggingface.save_t5(d, config, params)
  return d, config, params


def test_load_params_huggingface_selection_and_dtype(hf_dir):
  d, _, params = hf_dir
  assert formats.detect_format(d) == 'huggingface' and formats.read_step(d) is None
  out = params_lib.flatten_params(
      formats.load_params(d, ['token_embedder/embedding', 'decoder/decoder_norm'], dtype='float16')
  )
  assert sorted(out) == ['decoder/decoder_norm/scale', 'token_embedder/embedding']
  np.testing.assert_array_equal(
      out['token_embedder/embedding'], params['token_embedder']['embedding'].astype(np.float16)
  )


def test_save_t5_interrupted_keeps_the_old_weights(hf_dir, tmp_path, monkeypatch):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  src, config, params = hf_dir
  d = str(tmp_path / 'copy')
  shutil.copytree(src, d)
  before = open(os.path.join(d, 'model.safetensors'), 'rb').read()
  real_save_file = safetensors_numpy.save_file

  def killed(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    with open(filename, 'r+b') as f:
      f.truncate(100)  # Half written.
    raise KeyboardInterrupt('killed while writing the weights')

  monkeypatch.setattr(safetensors_numpy, 'save_file', killed)
  bigger = jax.tree_util.tree_map(lambda x: x + 1, params)
  with pytest.raises(KeyboardInterrupt):
    huggingface.save_t5(d, config, bigger)
  assert open(os.path.join(d, 'model.safetensors'), 'rb').read() == before
  assert sorted(os.listdir(d)) == sorted(os.listdir(src))  # No temporary files left.
  assert_trees_bit_equal(huggingface.load_t5(d)[1], params)


# ----------------------------------------------------------------------------
# The one shape-to-config reader (architectures.t5).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    'preset,overrides,decoder_only',
    [
        ('tiny', {}, False),
        ('tiny', {}, True),
        (
            't5_1_0_small',
            {'vocab_size': 48, 'num_encoder_layers': 2, 'num_decoder_layers': 3},
            False,
        ),
    ],
)
def test_config_fields_from_shapes(preset, overrides, decoder_only):
  config = t5.get_config(preset, **overrides)
  shapes = t5.init_variables(config, decoder_only=decoder_only, abstract=True)['params']
  fields = t5.config_fields_from_shapes(shapes)
  expected = {
      'vocab_size': config.vocab_size,
      'emb_dim': config.emb_dim,
      'num_heads': config.num_heads,
      'head_dim': config.head_dim,
      'mlp_dim': config.mlp_dim,
      'num_encoder_layers': 0 if decoder_only else config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'logits_via_embedding': config.logits_via_embedding,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
  }
  assert {k: fields[k] for k in expected} == expected
  assert len(fields['mlp_activations']) == len(config.mlp_activations)
  # The same from flat shapes and from t5x_format.list_variables-style (shape, dtype) pairs.
  flat = params_lib.flatten_params(shapes)
  assert t5.config_fields_from_shapes({k: v.shape for k, v in flat.items()}) == fields
  assert t5.config_fields_from_shapes({k: (v.shape, 'float32') for k, v in flat.items()}) == fields
  if not decoder_only:
    inferred = formats.infer_t5_config(shapes)
    assert all(getattr(inferred, k) == v for k, v in expected.items())


def test_check_params_names_the_cause():
  config = t5.get_config('tiny')
  wrong_vocab = t5.init_variables(
      t5.get_config('tiny', vocab_size=config.vocab_size + 8), abstract=True
  )['params']
  with pytest.raises(ValueError, match=r'Wrong vocabulary size: the checkpoint has \d+ embeddings'):
    t5.check_params(config, wrong_vocab)
  relu = t5.init_variables(
      t5.get_config('tiny', mlp_activations=('relu',), logits_via_embedding=True), abstract=True
  )['params']
  with pytest.raises(ValueError, match='T5 1.0 vs 1.1 mismatch: the checkpoint is T5 1.0-style'):
    t5.check_params(config, relu)
  wider = t5.init_variables(t5.get_config('tiny', mlp_dim=config.mlp_dim * 2), abstract=True)
  with pytest.raises(ValueError, match=f'Wrong model size preset: .*mlp_dim {config.mlp_dim * 2}'):
    t5.check_params(config, wider['params'])
  t5.check_params(config, t5.init_variables(config, abstract=True)['params'])  # Matches: no error.
