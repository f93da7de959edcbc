"""The prompt library: entries, metadata, backbone fingerprints, atomic and concurrent writes.

The fingerprint is checked against an independent transcription of its definition (sha256 of the
shape and of bfloat16-rounded fixed rows); the crash test kills `python -m prompt_tuning.library add`
with SIGKILL at each stage of a write and checks that the library still reads, with the old entry or
the new one.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from prompt_tuning import library
from prompt_tuning import prompts
from prompt_tuning.checkpoints import t5x_format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.pop(library.ENV_VAR, None)
  return env


def _cli(*args, check=True):
  proc = subprocess.run(
      [sys.executable, '-m', 'prompt_tuning.library', *args],
      env=_env(),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  if check:
    assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def _params(seed, vocab=64, dim=8):
  rng = np.random.default_rng(seed)
  return {
      'token_embedder': {'embedding': rng.normal(size=(vocab, dim)).astype(np.float32)},
      'encoder': {'encoder_norm': {'scale': np.ones((dim,), np.float32)}},
  }


@pytest.fixture(scope='module')
def backbones(tmp_path_factory):
  """Two tiny 'backbones' saved as T5X checkpoints (seed 0 and seed 1)."""
  root = tmp_path_factory.mktemp('backbones')
  out = {}
  for seed in (0, 1):
    path = str(root / f'seed{seed}' / 'checkpoint_0')
    t5x_format.save(path, _params(seed), 0)
    out[seed] = path
  return out


def _oracle_digest(table):
  """Independent transcription of the fingerprint definition."""
  v, h = table.shape
  ids = sorted(set(int(round(x)) for x in np.linspace(0, v - 1, min(16, v))))
  rows = table[ids].astype(np.float32).astype(ml_dtypes.bfloat16)
  raw = rows.view(np.uint16).astype('<u2').tobytes()
  return hashlib.sha256(f'{v}x{h}'.encode() + raw).hexdigest()


def test_fingerprint_matches_its_definition_for_every_input_kind(backbones, tmp_path):
  table = _params(0)['token_embedder']['embedding']
  expected = _oracle_digest(table)
  from_ckpt = library.backbone_fingerprint(backbones[0])
  assert from_ckpt.digest == expected
  assert (from_ckpt.vocab_size, from_ckpt.emb_dim) == (64, 8)
  assert library.backbone_fingerprint(_params(0)) == from_ckpt
  assert library.backbone_fingerprint(table) == from_ckpt
  npy = str(tmp_path / 'emb.npy')
  np.save(npy, table)
  assert library.backbone_fingerprint(npy) == from_ckpt
  # A bfloat16 copy of the same backbone has the same fingerprint; another seed does not.
  bf16 = table.astype(ml_dtypes.bfloat16)
  assert library.backbone_fingerprint(bf16) == from_ckpt
  assert library.backbone_fingerprint(backbones[1]) != from_ckpt
  # Changing one fingerprinted row changes it.
  changed = table.copy()
  changed[-1, 0] += 1.0
  assert library.backbone_fingerprint(changed) != from_ckpt


def test_add_get_list_version_and_metadata(backbones, tmp_path):
  lib = library.Library(str(tmp_path / 'lib'))
  assert lib.version() == 0 and lib.list() == []
  prompt = np.arange(24, dtype=np.float32).reshape(3, 8)
  bank = np.ones((2, 3, 8), np.float32)
  lib.add(
      'sst2_a',
      prompt,
      {'task': 'sst2', 'steps': 10, 'metrics': {'accuracy': 91.5}},
      backbone=backbones[0],
  )
  lib.add('bank', bank, {'task': 'mix'}, backbone=backbones[0])
  lib.add('other', prompt * 2, {'task': 'sst2'}, backbone=backbones[1])
  assert lib.version() == 3
  assert [i.name for i in lib.list()] == ['bank', 'other', 'sst2_a']
  assert [i.name for i in lib.list(backbone=backbones[0])] == ['bank', 'sst2_a']
  assert [i.name for i in lib.list(task='sst2')] == ['other', 'sst2_a']
  entry = lib.get('sst2_a', backbone=backbones[0])
  np.testing.assert_array_equal(entry.array, prompt)
  assert entry.metadata['metrics'] == {'accuracy': 91.5}
  assert entry.metadata['length'] == 3 and entry.metadata['kind'] == 'prompt'
  assert entry.metadata['backbone_source'] == backbones[0]
  assert lib.get('bank').metadata['kind'] == 'bank'
  np.testing.assert_array_equal(lib.get('bank').array, bank)
  # Overwrite only when asked; the old object is gone afterwards.
  with pytest.raises(library.LibraryError, match='already has an entry'):
    lib.add('sst2_a', prompt + 1, backbone=backbones[0])
  lib.add('sst2_a', prompt + 1, backbone=backbones[0], overwrite=True)
  np.testing.assert_array_equal(lib.get('sst2_a').array, prompt + 1)
  assert len(os.listdir(os.path.join(lib.path, library.OBJECTS_DIR))) == 3
  lib.remove('bank')
  assert 'bank' not in lib and lib.version() == 5
  assert len(os.listdir(os.path.join(lib.path, library.OBJECTS_DIR))) == 2


def test_errors_name_the_cause(backbones, tmp_path):
  lib = library.Library(str(tmp_path / 'lib'))
  lib.add('sst2_a', np.zeros((3, 8), np.float32), backbone=backbones[0])
  with pytest.raises(library.BackboneMismatchError) as e:
    lib.get('sst2_a', backbone=backbones[1])
  msg = str(e.value)
  assert str(library.backbone_fingerprint(backbones[0])) in msg
  assert str(library.backbone_fingerprint(backbones[1])) in msg
  assert backbones[0] in msg and backbones[1] in msg and 'recycle' in msg
  with pytest.raises(library.LibraryError, match='Did you mean sst2_a'):
    lib.get('sst2_b')
  with pytest.raises(library.LibraryError, match='Invalid library entry name'):
    lib.add('a/b', np.zeros((1, 8)), backbone=backbones[0])
  with pytest.raises(library.LibraryError, match='needs the backbone'):
    lib.add('nobackbone', np.zeros((1, 8)))
  lib.add('nobackbone', np.zeros((1, 8)), allow_no_backbone=True)
  with pytest.raises(library.BackboneMismatchError, match='no recorded backbone'):
    lib.get('nobackbone', backbone=backbones[0])


def test_library_refs_through_np_load(backbones, tmp_path, monkeypatch):
  lib_dir = str(tmp_path / 'lib')
  prompt = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  library.Library(lib_dir).add('p', prompt, backbone=backbones[0])
  np.testing.assert_array_equal(prompts.np_load('library:p', library_dir=lib_dir), prompt)
  np.testing.assert_array_equal(
      prompts.np_load('library:p', library_dir=lib_dir, backbone=backbones[0]), prompt
  )
  with pytest.raises(library.BackboneMismatchError):
    prompts.np_load('library:p', library_dir=lib_dir, backbone=backbones[1])
  with pytest.raises(library.LibraryError, match='LIBRARY_DIR'):
    prompts.np_load('library:p')
  monkeypatch.setenv(library.ENV_VAR, lib_dir)
  np.testing.assert_array_equal(prompts.np_load('library:p'), prompt)


_ADD_MANY = """
import sys
import numpy as np
from prompt_tuning import library
lib_dir, prefix, emb = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
lib = library.Library(lib_dir)
for i in range(6):
  lib.add(f'{prefix}{i}', np.full((2, 8), i, np.float32), {'i': i}, backbone=emb)
"""


def test_concurrent_writers_lose_nothing(tmp_path):
  lib_dir = str(tmp_path / 'lib')
  emb = str(tmp_path / 'emb.npy')
  np.save(emb, _params(0)['token_embedder']['embedding'])
  procs = [
      subprocess.Popen([sys.executable, '-c', _ADD_MANY, lib_dir, p, emb], env=_env(), cwd=REPO)
      for p in ('a', 'b', 'c')
  ]
  for p in procs:
    assert p.wait(120) == 0
  lib = library.Library(lib_dir)
  assert lib.names() == sorted(f'{p}{i}' for p in 'abc' for i in range(6))
  assert lib.version() == 18
  for name in lib.names():
    i = lib.get(name).metadata['i']
    np.testing.assert_array_equal(lib.get(name).array, np.full((2, 8), i, np.float32))


@pytest.mark.parametrize(
    'stage',
    ['writing array', 'moving', 'writing the index', 'committed'],
)
def test_kill_during_add_leaves_old_or_new_entry(tmp_path, stage):
  lib_dir = str(tmp_path / 'lib')
  emb = str(tmp_path / 'emb.npy')
  np.save(emb, _params(0)['token_embedder']['embedding'])
  old = np.zeros((64, 1024), np.float32)
  new = np.ones((4096, 1024), np.float32)  # 16 MiB: the write takes a while
  np.save(str(tmp_path / 'new.npy'), new)
  library.Library(lib_dir).add('p', old, backbone=emb)
  proc = subprocess.Popen(
      [
          sys.executable,
          '-m',
          'prompt_tuning.library',
          '--library',
          lib_dir,
          'add',
          'p',
          '--prompt',
          str(tmp_path / 'new.npy'),
          '--backbone',
          emb,
          '--overwrite',
          '-v',
      ],
      env=_env(),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )
  seen = []
  try:
    for line in proc.stdout:
      seen.append(line)
      if stage in line:
        os.kill(proc.pid, signal.SIGKILL)
        break
  finally:
    proc.wait(60)
  assert any(stage in line for line in seen), seen
  assert proc.returncode == -signal.SIGKILL
  lib = library.Library(lib_dir)
  value = lib.get('p', backbone=emb).array
  assert value.shape in (old.shape, new.shape)
  np.testing.assert_array_equal(value, old if value.shape == old.shape else new)
  # The library stays writable after the crash, and the next writer's entry is readable.
  lib.add('p', new[:2], backbone=emb, overwrite=True)
  np.testing.assert_array_equal(lib.get('p').array, new[:2])


def test_cli_list_show_export_rm(tmp_path):
  lib_dir = str(tmp_path / 'lib')
  backbones = {}
  for seed in (0, 1):
    backbones[seed] = str(tmp_path / f'emb{seed}.npy')
    np.save(backbones[seed], _params(seed)['token_embedder']['embedding'])
  prompt = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
  np.save(str(tmp_path / 'p.npy'), prompt)
  out = _cli(
      '--library',
      lib_dir,
      'add',
      'sst2_a',
      '--prompt',
      str(tmp_path / 'p.npy'),
      '--backbone',
      backbones[0],
      '--task',
      'sst2',
      '--steps',
      '7',
      '--metrics',
      '{"accuracy": 93.0}',
  ).stdout
  assert 'added sst2_a' in out
  listing = _cli('--library', lib_dir, 'list').stdout
  assert 'sst2_a' in listing and 'accuracy=93' in listing and '3x8' in listing
  assert 'sst2_a' not in _cli('--library', lib_dir, 'list', '--backbone', backbones[1]).stdout
  meta = json.loads(_cli('--library', lib_dir, 'show', 'sst2_a').stdout)
  assert meta['steps'] == 7 and meta['task'] == 'sst2'
  _cli('--library', lib_dir, 'export', 'sst2_a', '--output', str(tmp_path / 'out.npy'))
  np.testing.assert_array_equal(np.load(str(tmp_path / 'out.npy')), prompt)
  bad = _cli('--library', lib_dir, 'show', 'nope', check=False)
  assert bad.returncode == 1 and 'ERROR: LibraryError' in bad.stderr
  assert 'Traceback' not in bad.stderr
  _cli('--library', lib_dir, 'rm', 'sst2_a')
  assert '(no entries' in _cli('--library', lib_dir, 'list').stdout


def test_add_from_a_checkpoint_reads_the_prompt_and_step(backbones, tmp_path):
  params = _params(0)
  prompt = np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32)
  params['encoder']['prompt'] = {'prompt': {'prompt': prompt}}
  ckpt = str(tmp_path / 'run' / 'checkpoint_42')
  t5x_format.save(ckpt, params, 42)
  lib_dir = str(tmp_path / 'lib')
  _cli('--library', lib_dir, 'add', 'from_ckpt', '--prompt', ckpt, '--backbone', ckpt)
  entry = library.Library(lib_dir).get('from_ckpt', backbone=backbones[0])
  np.testing.assert_array_equal(entry.array, prompt)
  assert entry.metadata['steps'] == 42
