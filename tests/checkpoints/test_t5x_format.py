"""Tests for prompt_tuning.checkpoints.t5x_format and .formats.

Checkpoints are written two ways: by hand (tensorstore + flax msgpack, exactly
the layout T5X writes, with both spec path forms) and by `t5x_format.save`.
Arrays are cross-checked with an independent zarr reader (json + gzip + numpy).
"""

import gzip
import json
import math
import os
import subprocess
import sys
import textwrap

from flax import serialization
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from prompt_tuning import fs
from prompt_tuning import params as params_lib
from prompt_tuning.checkpoints import formats
from prompt_tuning.checkpoints import t5x_format
from prompt_tuning.runtime import adafactor

BF16 = ml_dtypes.bfloat16
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def read_zarr_with_numpy(array_dir):
  """Independent zarr v2 reader: .zarray + gzip chunk files + numpy."""
  with open(os.path.join(array_dir, '.zarray')) as f:
    meta = json.load(f)
  assert meta['zarr_format'] == 2
  assert meta['order'] == 'C'
  assert meta['compressor'] == {'id': 'gzip', 'level': 1}
  assert meta.get('filters') is None
  sep = meta.get('dimension_separator', '.')
  dtype = BF16 if meta['dtype'] == 'bfloat16' else np.dtype(meta['dtype'])
  shape, chunks = meta['shape'], meta['chunks']
  out = np.zeros(shape, dtype)
  grid = [math.ceil(s / c) for s, c in zip(shape, chunks)]
  for idx in np.ndindex(*grid):
    name = sep.join(str(i) for i in idx) if idx else '0'
    with open(os.path.join(array_dir, name), 'rb') as f:
      raw = gzip.decompress(f.read())
    block = np.frombuffer(raw, dtype).reshape(chunks, order='C')
    sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
    crop = tuple(slice(0, x.stop - x.start) for x in sl)  # Edge chunks.
    out[sl] = block[crop]
  return out


def bits(x):
  x = np.asarray(x)
  return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bit_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype, (a.dtype, b.dtype)
  assert a.shape == b.shape, (a.shape, b.shape)
  np.testing.assert_array_equal(bits(a), bits(b))


def assert_trees_bit_equal(a, b):
  fa, fb = params_lib.flatten_params(a), params_lib.flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert_bit_equal(fa[k], fb[k])


def random_bits(shape, dtype, seed):
  """Arbitrary bit patterns (NaN payloads, infs, denormals included)."""
  dtype = np.dtype(dtype)
  n = int(np.prod(shape))
  rng = np.random.default_rng(seed)
  raw = rng.integers(0, 256, size=n * dtype.itemsize, dtype=np.uint8)
  return raw.view(dtype).reshape(shape)


def write_ts_array(directory, name, arr, chunks, legacy_path_form=False):
  """Writes `arr` as T5X does; returns the spec dict stored in the msgpack."""
  dtype_name = 'bfloat16' if arr.dtype == BF16 else arr.dtype.name
  metadata = {
      'chunks': list(chunks),
      'compressor': {'id': 'gzip', 'level': 1},
      'shape': list(arr.shape),
  }
  spec = {
      'driver': 'zarr',
      'dtype': dtype_name,
      'metadata': metadata,
      'kvstore': {'driver': 'file', 'path': os.path.join(directory, name)},
  }
  ts.open(spec, create=True).result().write(arr).result()
  if legacy_path_form:
    return {
        'driver': 'zarr',
        'dtype': dtype_name,
        'path': name,
        'kvstore': {'driver': 'file'},
        'metadata': metadata,
    }
  return {
      'driver': 'zarr',
      'dtype': dtype_name,
      'metadata': metadata,
      'kvstore': {'driver': 'gfile', 'path': name + '/'},
  }


def write_msgpack(directory, contents):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(contents))


@pytest.fixture(scope='module')
def handmade(tmp_path_factory):
  """A T5X-layout checkpoint written without t5x_format; returns (dir, truth)."""
  d = str(tmp_path_factory.mktemp('handmade') / 'checkpoint_100')
  os.makedirs(d)
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((10, 5)).astype(np.float32)
  kernel = rng.standard_normal((5, 7)).astype(BF16)
  wi = rng.standard_normal((4, 6)).astype(np.float32)
  scale = rng.standard_normal((5,)).astype(BF16)  # Inline bfloat16.
  v_row = rng.random((5,)).astype(np.float32)
  v_col = rng.random((7,)).astype(np.float32)
  target = {
      'token_embedder': {
          'embedding': write_ts_array(d, 'target.token_embedder.embedding', emb, [3, 2])
      },
      'encoder': {
          'layers_0': {
              'attention': {
                  'query': {
                      'kernel': write_ts_array(
                          d,
                          'target.encoder.layers_0.attention.query.kernel',
                          kernel,
                          [2, 7],
                          legacy_path_form=True,
                      )
                  }
              },
              'mlp': {
                  'wi': {
                      'kernel': write_ts_array(
                          d, 'target.encoder.layers_0.mlp.wi.kernel', wi, [4, 6]
                      )
                  }
              },
              'pre_attention_layer_norm': {'scale': scale},
          },
      },
  }
  # A GCS-style spec (dummy bucket, patched at read time to the real place).
  relpos = rng.standard_normal((2, 32)).astype(np.float32)
  spec = write_ts_array(d, 'target.encoder.relpos_bias.rel_embedding', relpos, [2, 16])
  spec['kvstore'] = {'driver': 'gcs', 'bucket': 't5x-dummy-bucket', 'path': spec['kvstore']['path']}
  target['encoder']['relpos_bias'] = {'rel_embedding': spec}
  state = {
      'step': np.asarray(100, np.int32),
      'param_states': {
          'token_embedder': {
              'embedding': {
                  'v_row': write_ts_array(
                      d,
                      'state.param_states.token_embedder.embedding.v_row',
                      rng.random((10,)).astype(np.float32),
                      [10],
                  ),
                  'v_col': np.zeros((1,), np.float32),
                  'v': np.zeros((1,), np.float32),
                  'm': np.zeros((1,), np.float32),
              }
          },
          'encoder': {
              'layers_0': {
                  'attention': {
                      'query': {
                          'kernel': {
                              'v_row': v_row,
                              'v_col': v_col,
                              'v': np.zeros((1,), np.float32),
                              'm': np.zeros((1,), np.float32),
                          }
                      }
                  }
              }
          },
          'frozen': None,
      },
  }
  write_msgpack(d, {'version': 3, 'optimizer': {'target': target, 'state': state}})
  truth = {
      'token_embedder': {'embedding': emb},
      'encoder': {
          'layers_0': {
              'attention': {'query': {'kernel': kernel}},
              'mlp': {'wi': {'kernel': wi}},
              'pre_attention_layer_norm': {'scale': scale},
          },
          'relpos_bias': {'rel_embedding': relpos},
      },
  }
  return d, truth


def tiny_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'token_embedder': {'embedding': random_bits((40, 16), np.float32, seed)},
      'encoder': {
          'layers_0': {
              'attention': {
                  'query': {'kernel': random_bits((16, 12), BF16, seed + 1)},
                  'key': {'kernel': rng.standard_normal((16, 8)).astype(np.float32)},
              },
              'pre_attention_layer_norm': {'scale': np.ones(16, BF16)},
          },
          'encoder_norm': {'scale': np.full((16,), 0.5, np.float32)},
          'prompt': {'prompt': {'prompt': rng.standard_normal((5, 16)).astype(np.float32)}},
      },
      'decoder': {'logits_dense': {'kernel': rng.standard_normal((16, 40)).astype(BF16)}},
  }


# ----------------------------------------------------------------------------
# Reading hand-made (T5X-layout) checkpoints.
# ----------------------------------------------------------------------------


def test_load_handmade_checkpoint(handmade):
  d, truth = handmade
  assert_trees_bit_equal(t5x_format.load(d), truth)


def test_load_handmade_matches_independent_reader(handmade):
  d, truth = handmade
  loaded = t5x_format.load(d)
  emb = read_zarr_with_numpy(os.path.join(d, 'target.token_embedder.embedding'))
  assert_bit_equal(emb, truth['token_embedder']['embedding'])
  assert_bit_equal(loaded['token_embedder']['embedding'], emb)
  kernel = read_zarr_with_numpy(os.path.join(d, 'target.encoder.layers_0.attention.query.kernel'))
  assert kernel.dtype == BF16
  assert_bit_equal(loaded['encoder']['layers_0']['attention']['query']['kernel'], kernel)


def test_path_forms(handmade):
  d, truth = handmade
  from_file = t5x_format.load(os.path.join(d, 'checkpoint'))
  assert_trees_bit_equal(from_file, truth)
  from_model_dir = t5x_format.load(os.path.dirname(d))
  assert_trees_bit_equal(from_model_dir, truth)
  import pathlib  # pylint: disable=g-import-not-at-top

  assert_trees_bit_equal(t5x_format.load(pathlib.Path(d)), truth)


def test_load_full_state(handmade):
  d, _ = handmade
  full = t5x_format.load_t5x_checkpoint(d)
  assert set(full) == {'target', 'state'}
  assert int(full['state']['step']) == 100
  ps = full['state']['param_states']
  assert ps['frozen'] is None
  assert ps['token_embedder']['embedding']['v_row'].shape == (10,)
  assert ps['encoder']['layers_0']['attention']['query']['kernel']['v_col'].shape == (7,)


def _count_opens(monkeypatch):
  """From now on, records the array paths tensorstore opens (returned list)."""
  opened = []
  real_open = ts.open

  def counting_open(spec, *args, **kwargs):
    opened.append(spec['kvstore']['path'])
    return real_open(spec, *args, **kwargs)

  monkeypatch.setattr(ts, 'open', counting_open)
  return opened


def test_read_step_and_selected_state_variables(handmade, monkeypatch):
  d, _ = handmade
  full = t5x_format.load_t5x_checkpoint(d)
  opened = _count_opens(monkeypatch)
  assert t5x_format.read_step(d) == 100
  assert not opened  # the step is read without opening an array
  name = 'param_states/token_embedder/embedding/v_row'
  out = t5x_format.load_state_variables(d, [name, 'param_states/not/there/v'])
  assert list(out) == [name]  # absent names are left out
  np.testing.assert_array_equal(
      out[name], full['state']['param_states']['token_embedder']['embedding']['v_row']
  )
  assert len(opened) <= 1  # only the requested array (or none, when stored inline)


def test_list_variables_reads_no_array(handmade, monkeypatch):
  d, truth = handmade
  monkeypatch.setattr(ts, 'open', _forbidden_open)
  listing = t5x_format.list_variables(d)
  flat = params_lib.flatten_params(truth)
  assert set(listing) == set(flat)
  for k, (shape, dtype) in listing.items():
    assert shape == flat[k].shape
    assert dtype == ('bfloat16' if flat[k].dtype == BF16 else flat[k].dtype.name)
  with_state = t5x_format.list_variables(d, include_state=True)
  assert with_state['state/step'] == ((), 'int32')
  assert 'target/token_embedder/embedding' in with_state


def test_load_dtype_cast(handmade):
  d, truth = handmade
  loaded = t5x_format.load(d, dtype=np.float32)
  for k, v in params_lib.flatten_params(loaded).items():
    assert v.dtype == np.float32, k
  k = loaded['encoder']['layers_0']['attention']['query']['kernel']
  np.testing.assert_array_equal(
      k, truth['encoder']['layers_0']['attention']['query']['kernel'].astype(np.float32)
  )
  bf = t5x_format.load(d, 'token_embedder/embedding', dtype='bfloat16')
  assert bf['token_embedder']['embedding'].dtype == BF16


# ----------------------------------------------------------------------------
# Selective loading.
# ----------------------------------------------------------------------------


def _forbidden_open(*args, **kwargs):
  raise AssertionError(f'tensorstore.open called: {args} {kwargs}')


def test_selective_load_opens_only_selected(handmade, monkeypatch):
  d, truth = handmade
  opened = _count_opens(monkeypatch)
  out = t5x_format.load(d, ['token_embedder/embedding'])
  assert list(params_lib.flatten_params(out)) == ['token_embedder/embedding']
  assert_bit_equal(out['token_embedder']['embedding'], truth['token_embedder']['embedding'])
  assert len(opened) == 1 and 'target.token_embedder.embedding' in opened[0]


def test_selective_load_without_other_chunk_files(tmp_path):
  params = tiny_params()
  d = t5x_format.save(str(tmp_path / 'checkpoint_3'), params, 3)
  # Delete every array except the embedding: loading it must still work.
  import shutil  # pylint: disable=g-import-not-at-top

  deleted = [
      e for e in os.listdir(d) if e.startswith('target.') and e != 'target.token_embedder.embedding'
  ]
  assert len(deleted) >= 3
  for entry in deleted:
    shutil.rmtree(os.path.join(d, entry))
  out = t5x_format.load(d, variables=['token_embedder/embedding'])
  assert_bit_equal(out['token_embedder']['embedding'], params['token_embedder']['embedding'])
  v = t5x_format.load_variable(d, 'target/token_embedder/embedding')
  assert_bit_equal(v, params['token_embedder']['embedding'])
  with pytest.raises(
      t5x_format.CheckpointError, match="Cannot open the array of variable 'decoder/logits"
  ):
    t5x_format.load(d, ['decoder/logits_dense/kernel'])


def test_selection_by_regex_and_prefix(handmade, monkeypatch):
  d, truth = handmade
  monkeypatch.setattr(ts, 'open', _forbidden_open)
  # Inline leaves only: no array is opened.
  out = t5x_format.load(d, [r'.*/pre_attention_layer_norm/scale'])
  assert_bit_equal(
      out['encoder']['layers_0']['pre_attention_layer_norm']['scale'],
      truth['encoder']['layers_0']['pre_attention_layer_norm']['scale'],
  )
  monkeypatch.undo()
  out = t5x_format.load(d, ['encoder/layers_0'])
  assert sorted(params_lib.flatten_params(out)) == [
      'encoder/layers_0/attention/query/kernel',
      'encoder/layers_0/mlp/wi/kernel',
      'encoder/layers_0/pre_attention_layer_norm/scale',
  ]
  out = t5x_format.load(d, r'encoder/layers_\d+/.*/kernel')
  assert sorted(params_lib.flatten_params(out)) == [
      'encoder/layers_0/attention/query/kernel',
      'encoder/layers_0/mlp/wi/kernel',
  ]


def test_unknown_variable_lists_close_matches(handmade):
  d, _ = handmade
  with pytest.raises(t5x_format.UnknownVariableError) as e:
    t5x_format.load(d, ['token_embedder/embeddings'])
  msg = str(e.value)
  assert "'token_embedder/embeddings' is not in the checkpoint" in msg
  assert 'Close matches: token_embedder/embedding' in msg
  assert isinstance(e.value, KeyError)
  with pytest.raises(KeyError, match='encoder/layers_0/mlp/wi/kernel'):
    t5x_format.load_variable(d, 'encoder/layers_0/mlp/wi_0/kernel')


# ----------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------


def test_save_load_round_trip_bit_exact(tmp_path):
  params = tiny_params()
  d = t5x_format.save(str(tmp_path / 'checkpoint_5'), params, 5)
  assert d == str(tmp_path / 'checkpoint_5')
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_5']  # No tmp left.
  assert_trees_bit_equal(t5x_format.load(d), params)
  assert t5x_format.load(d)['decoder']['logits_dense']['kernel'].dtype == BF16


def test_save_layout_matches_t5x(tmp_path):
  params = tiny_params()
  d = t5x_format.save(str(tmp_path / 'checkpoint_5'), params, 5, max_chunk_bytes=512)
  entries = set(os.listdir(d))
  assert 'checkpoint' in entries
  assert 'target.token_embedder.embedding' in entries
  assert 'target.encoder.layers_0.attention.query.kernel' in entries
  assert 'target.encoder.prompt.prompt.prompt' in entries
  with open(os.path.join(d, 'checkpoint'), 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  assert set(contents) == {'version', 'optimizer'}
  assert contents['version'] == 3
  assert int(contents['optimizer']['state']['step']) == 5
  spec = contents['optimizer']['target']['token_embedder']['embedding']
  assert spec['driver'] == 'zarr'
  assert spec['dtype'] == 'float32'
  assert spec['kvstore'] == {'driver': 'file', 'path': 'target.token_embedder.embedding/'}
  assert spec['metadata']['compressor'] == {'id': 'gzip', 'level': 1}
  assert spec['metadata']['shape'] == [40, 16]
  chunks = spec['metadata']['chunks']
  assert math.prod(chunks) * 4 <= 512 and [40 % chunks[0], 16 % chunks[1]] == [0, 0]
  zarray = json.load(open(os.path.join(d, 'target.token_embedder.embedding', '.zarray')))
  assert zarray['chunks'] == chunks and zarray['order'] == 'C'
  assert zarray['dtype'] == '<f4'
  bf_spec = contents['optimizer']['target']['decoder']['logits_dense']['kernel']
  assert bf_spec['dtype'] == 'bfloat16'
  # Independent reader agrees bit for bit with what was saved.
  for name, value in params_lib.flatten_params(params).items():
    array_dir = os.path.join(d, 'target.' + name.replace('/', '.'))
    if os.path.isdir(array_dir):
      assert_bit_equal(read_zarr_with_numpy(array_dir), value)
    else:  # Inline: small leaves only.
      assert value.nbytes <= t5x_format.DEFAULT_INLINE_MAX_SIZE


def test_save_inline_max_size(tmp_path):
  params = tiny_params()
  d = t5x_format.save(str(tmp_path / 'a'), params, 1, inline_max_size=0)
  n_leaves = len(params_lib.flatten_params(params))
  assert len([e for e in os.listdir(d) if e.startswith('target.')]) == n_leaves
  d2 = t5x_format.save(str(tmp_path / 'b'), params, 1, inline_max_size=1 << 20)
  assert os.listdir(d2) == ['checkpoint']
  assert_trees_bit_equal(t5x_format.load(d), params)
  assert_trees_bit_equal(t5x_format.load(d2), params)


def test_save_with_optimizer_state_and_dtype(tmp_path):
  import collections  # pylint: disable=g-import-not-at-top

  params = {
      'encoder': {'prompt': {'prompt': {'prompt': np.arange(48, dtype=np.float32).reshape(6, 8)}}},
      'frozen': {'w': np.ones((8, 8), np.float32)},
  }
  param_states = {
      'encoder': {
          'prompt': {
              'prompt': {
                  'prompt': {
                      'v_row': np.full((6,), 2.0, np.float32),
                      'v_col': np.full((8,), 3.0, np.float32),
                      'v': np.zeros((1,), np.float32),
                      'm': np.zeros((1,), np.float32),
                  }
              }
          }
      },
      'frozen': {'w': None},
  }
  opt_state = collections.namedtuple('OptimizerState', ['step', 'param_states'])(7, param_states)
  d = t5x_format.save(
      str(tmp_path / 'checkpoint_7'),
      params,
      7,
      optimizer_state=opt_state,
      dtype='bfloat16',
      inline_max_size=0,
  )
  assert 'state.param_states.encoder.prompt.prompt.prompt.v_row' in os.listdir(d)
  full = t5x_format.load_t5x_checkpoint(d)
  assert int(full['state']['step']) == 7
  got = full['state']['param_states']
  assert got['frozen']['w'] is None
  for k in ('v_row', 'v_col', 'v', 'm'):
    s = got['encoder']['prompt']['prompt']['prompt'][k]
    assert_bit_equal(s, param_states['encoder']['prompt']['prompt']['prompt'][k])
  loaded = t5x_format.load(d)
  assert loaded['frozen']['w'].dtype == BF16  # Target cast, state kept.
  np.testing.assert_array_equal(
      loaded['encoder']['prompt']['prompt']['prompt'].astype(np.float32),
      params['encoder']['prompt']['prompt']['prompt'],
  )
  # The param_states tree itself (no wrapper) is accepted too.
  d2 = t5x_format.save(str(tmp_path / 'checkpoint_8'), params, 8, optimizer_state=param_states)
  got2 = t5x_format.load_t5x_checkpoint(d2)['state']['param_states']
  assert_bit_equal(
      got2['encoder']['prompt']['prompt']['prompt']['v_col'],
      param_states['encoder']['prompt']['prompt']['prompt']['v_col'],
  )


def test_save_jax_arrays(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  params = {
      'a': {'kernel': jnp.arange(600, dtype=jnp.bfloat16).reshape(20, 30)},
      'b': jnp.ones((3,), jnp.float32),
  }
  d = t5x_format.save(str(tmp_path / 'c'), params, 0)
  out = t5x_format.load(d)
  assert_bit_equal(out['a']['kernel'], np.asarray(params['a']['kernel']))
  assert_bit_equal(out['b'], np.asarray(params['b']))


def test_save_refuses_existing_and_overwrite(tmp_path):
  d = t5x_format.save(str(tmp_path / 'checkpoint_1'), tiny_params(0), 1)
  with pytest.raises(FileExistsError, match='already exists'):
    t5x_format.save(d, tiny_params(1), 1)
  t5x_format.save(d, tiny_params(1), 2, overwrite=True)
  assert_trees_bit_equal(t5x_format.load(d), tiny_params(1))
  assert sorted(os.listdir(tmp_path)) == ['checkpoint_1']


def test_save_rejects_bad_keys(tmp_path):
  with pytest.raises(ValueError, match="contain no '/'"):
    t5x_format.save(str(tmp_path / 'x'), {'a/b': np.ones((100,))}, 0)
  with pytest.raises(ValueError, match='same array directory'):
    t5x_format.save(str(tmp_path / 'y'), {'a.b': np.ones((100,)), 'a': {'b': np.ones((100,))}}, 0)
  assert not os.listdir(tmp_path)  # Failed saves leave nothing behind.


def test_choose_chunk_shape():
  for shape, itemsize, limit in [
      ((32128, 768), 4, 64 << 20),
      ((32128, 4096), 4, 64 << 20),
      ((1000, 7), 2, 100),
      ((13,), 4, 16),
      ((768,), 4, 64 << 20),
  ]:
    chunks = t5x_format._choose_chunk_shape(shape, itemsize, limit)
    assert all(s % c == 0 for s, c in zip(shape, chunks))
    assert math.prod(chunks) * itemsize <= max(limit, itemsize)
  assert t5x_format._choose_chunk_shape((32128, 512), 4) == [32128, 512]
  assert t5x_format._choose_chunk_shape((32128, 768), 4) == [16064, 768]


# ----------------------------------------------------------------------------
# Atomicity.
# ----------------------------------------------------------------------------


def test_killed_save_leaves_nothing_loadable(tmp_path):
  """A process killed before the rename leaves only a refused .tmp- dir."""
  target = str(tmp_path / 'checkpoint_9')
  script = textwrap.dedent(f"""
      import os
      import numpy as np
      from prompt_tuning import fs
      from prompt_tuning.checkpoints import t5x_format
      def die(*a, **k):
        os._exit(17)  # Killed while writing the msgpack file.
      fs.write_bytes = die
      t5x_format.save({target!r}, {{'w': np.ones((64, 64), np.float32)}}, 9)
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-c', script], env=env, check=False, capture_output=True, timeout=120
  )
  assert proc.returncode == 17, proc.stderr.decode()[-2000:]
  leftovers = os.listdir(tmp_path)
  assert len(leftovers) == 1 and leftovers[0].startswith('checkpoint_9.tmp-')
  tmp_dir = str(tmp_path / leftovers[0])
  assert 'target.w' in os.listdir(tmp_dir)  # Arrays were written.
  with pytest.raises(FileNotFoundError, match='does not exist'):
    t5x_format.load(target)
  with pytest.raises(t5x_format.CheckpointError, match='unfinished'):
    t5x_format.load(tmp_dir)
  # A model dir with only an unfinished save: refused, tmp dir mentioned.
  with pytest.raises(t5x_format.CheckpointError, match='unfinished saves'):
    t5x_format.load(str(tmp_path))
  with pytest.raises(ValueError, match='unfinished'):
    formats.detect_format(tmp_dir)
  # A later complete save is found; the leftover is ignored.
  t5x_format.save(str(tmp_path / 'checkpoint_4'), {'w': np.zeros((3,))}, 4)
  np.testing.assert_array_equal(t5x_format.load(str(tmp_path))['w'], np.zeros((3,)))


def test_tmp_dir_with_checkpoint_file_is_refused(handmade, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top

  d, _ = handmade
  tmp = str(tmp_path / 'checkpoint_100.tmp-1700000000')
  shutil.copytree(d, tmp)
  with pytest.raises(t5x_format.CheckpointError, match='unfinished'):
    t5x_format.load(tmp)
  with pytest.raises(t5x_format.CheckpointError, match='unfinished'):
    t5x_format.load(os.path.join(tmp, 'checkpoint'))
  assert t5x_format.checkpoint_steps(str(tmp_path)) == []


def test_failed_save_cleans_up(tmp_path, monkeypatch):
  def boom(*args, **kwargs):
    raise RuntimeError('disk full')

  monkeypatch.setattr(fs, 'write_bytes', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    t5x_format.save(str(tmp_path / 'checkpoint_1'), tiny_params(), 1)
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_missing_directory(tmp_path):
  missing = str(tmp_path / 'nope' / 'checkpoint_1')
  with pytest.raises(FileNotFoundError, match='nope/checkpoint_1 does not'):
    t5x_format.load(missing)


def test_not_a_t5x_checkpoint(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(
      t5x_format.CheckpointError, match='not a T5X checkpoint: it has no "checkpoint"'
  ):
    t5x_format.load(str(empty))
  other = tmp_path / 'other'
  write_msgpack(str(other), {'params': np.ones(3)})
  with pytest.raises(
      t5x_format.CheckpointError,
      match=r"expected top-level keys \['optimizer', 'version'" r"\], found \['params'\]",
  ):
    t5x_format.load(str(other))
  garbage = tmp_path / 'garbage'
  garbage.mkdir()
  (garbage / 'checkpoint').write_bytes(b'\xc1\xc1 not msgpack')
  with pytest.raises(t5x_format.CheckpointError, match='not a msgpack file'):
    t5x_format.load(str(garbage))
  tf_ckpt = tmp_path / 'tf'
  tf_ckpt.mkdir()
  (tf_ckpt / 'checkpoint').write_text('model_checkpoint_path: "model.ckpt"\n')
  with pytest.raises(t5x_format.CheckpointError, match='TensorFlow'):
    t5x_format.load(str(tf_ckpt))
  orbax_dir = tmp_path / 'orbax' / 'state'
  orbax_dir.mkdir(parents=True)
  (orbax_dir / '_METADATA').write_text('{}')
  with pytest.raises(t5x_format.CheckpointError, match='Orbax'):
    t5x_format.load(str(tmp_path / 'orbax'))


def test_old_version_refused(tmp_path):
  d = str(tmp_path / 'checkpoint_1')
  write_msgpack(d, {'version': 1, 'optimizer': {'target': {'w': np.ones(2)}}})
  with pytest.raises(t5x_format.CheckpointError, match='version 1; versions earlier than 2'):
    t5x_format.load(d)
  write_msgpack(d, {'version': 2, 'optimizer': {'target': {'w': np.ones(2)}}})
  np.testing.assert_array_equal(t5x_format.load(d)['w'], np.ones(2))


def test_model_dir_step_selection(tmp_path):
  for step in (10, 200, 30):
    t5x_format.save(
        str(tmp_path / f'checkpoint_{step}'), {'w': np.full((2,), step, np.int32)}, step
    )
  assert t5x_format.checkpoint_steps(str(tmp_path)) == [10, 30, 200]
  assert int(t5x_format.load(str(tmp_path))['w'][0]) == 200
  assert int(t5x_format.load(str(tmp_path), step=30)['w'][0]) == 30
  with pytest.raises(FileNotFoundError, match=r'step 5 .*\[10, 30, 200\]'):
    t5x_format.load(str(tmp_path), step=5)


# ----------------------------------------------------------------------------
# Remote specs (no network: only the spec translation is checked).
# ----------------------------------------------------------------------------


def test_gcs_kvstore_spec():
  ckpt = 'gs://my-bucket/models/base/checkpoint_1100000'
  spec = {
      'driver': 'zarr',
      'kvstore': {
          'driver': 'gcs',
          'bucket': 't5x-dummy-bucket',
          'path': 'target.token_embedder.embedding/',
      },
  }
  loc = t5x_format._array_dir(ckpt, spec)
  assert loc == ckpt + '/target.token_embedder.embedding'
  assert t5x_format._kvstore_spec(loc) == {
      'driver': 'gcs',
      'bucket': 'my-bucket',
      'path': 'models/base/checkpoint_1100000/target.token_embedder.embedding/',
  }
  legacy = {'driver': 'zarr', 'kvstore': {'driver': 'gcs', 'bucket': 'b'}, 'path': 'target.x'}
  assert t5x_format._array_dir(ckpt, legacy) == ckpt + '/target.x'
  ts.Spec({'driver': 'zarr', 'kvstore': t5x_format._kvstore_spec(loc)})


# ----------------------------------------------------------------------------
# Format detection.
# ----------------------------------------------------------------------------


def test_detect_format(handmade, tmp_path):
  d, truth = handmade
  assert formats.detect_format(d) == 't5x'
  assert formats.detect_format(os.path.join(d, 'checkpoint')) == 't5x'
  assert formats.detect_format(os.path.dirname(d)) == 't5x'  # Model dir.
  hf = tmp_path / 'hf'
  hf.mkdir()
  (hf / 'config.json').write_text('{}')
  (hf / 'model.safetensors').write_bytes(b'')
  assert formats.detect_format(str(hf)) == 'huggingface'
  hf2 = tmp_path / 'hf2'
  hf2.mkdir()
  (hf2 / 'config.json').write_text('{}')
  (hf2 / 'pytorch_model.bin').write_bytes(b'')
  assert formats.detect_format(str(hf2)) == 'huggingface'
  ob = tmp_path / 'ob' / 'checkpoint_5' / 'state'
  ob.mkdir(parents=True)
  (ob / 'manifest.ocdbt').write_bytes(b'')
  assert formats.detect_format(str(tmp_path / 'ob' / 'checkpoint_5')) == 'orbax'
  # Not one of ours (no prompt_tuning_checkpoint.json): refused, naming cause and fix.
  with pytest.raises(ValueError, match='orbax checkpoint without prompt_tuning_checkpoint.json'):
    formats.load_params(str(tmp_path / 'ob' / 'checkpoint_5'))
  other = tmp_path / 'other'
  write_msgpack(str(other), {'params': 1})
  with pytest.raises(ValueError) as e:
    formats.detect_format(str(other))
  assert str(other) in str(e.value)
  for looked_for in ('config.json', '_CHECKPOINT_METADATA', '{version, optim'):
    assert looked_for in str(e.value)
  with pytest.raises(FileNotFoundError):
    formats.detect_format(str(tmp_path / 'missing'))
  out = formats.load_params(d, ['token_embedder/embedding'])
  assert_bit_equal(out['token_embedder']['embedding'], truth['token_embedder']['embedding'])


def test_detect_real_orbax_checkpoint(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = tmp_path / 'checkpoint_1'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / 'state', {'w': np.ones((4,), np.float32)})
  assert formats.detect_format(str(path)) == 'orbax'


def test_save_real_adafactor_state(tmp_path):
  params = {'encoder': {'prompt': {'prompt': {'prompt': random_bits((4, 300), np.float32, 3)}}}}
  state = adafactor.Adafactor().init_state(params)
  d = t5x_format.save(
      str(tmp_path / 'checkpoint_5'), params, 5, optimizer_state=state, inline_max_size=0
  )
  assert 'state.param_states.encoder.prompt.prompt.prompt.v' in os.listdir(d)
  full = t5x_format.load_t5x_checkpoint(d)
  got = full['state']['param_states']['encoder']['prompt']['prompt']['prompt']
  want = serialization.to_state_dict(state.param_states)['encoder']['prompt']['prompt']['prompt']
  assert sorted(got) == sorted(want) == ['m', 'v', 'v_col', 'v_row']
  for k in want:
    assert_bit_equal(got[k], np.asarray(want[k]))
  assert_trees_bit_equal(full['target'], params)
