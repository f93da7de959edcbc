"""Tests for prompt_tuning.fs on local paths, and of its URL branch against a fake gfile."""

import os
import subprocess
import sys
import textwrap

import pytest

from prompt_tuning import fs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_is_remote_and_path_arithmetic():
  assert fs.is_remote('gs://bucket/a') and fs.is_remote('s3://b/c') and fs.is_remote('file:///x')
  assert not fs.is_remote('/tmp/a') and not fs.is_remote('relative/gs://x')
  assert not fs.is_remote('~/a')
  assert fs.join('gs://b/m/', 'checkpoint_3', '/target.x/') == 'gs://b/m/checkpoint_3/target.x'
  assert fs.join('/a', 'b', 'c') == os.path.join('/a', 'b', 'c')
  assert fs.basename('gs://b/m/checkpoint_3/') == 'checkpoint_3'
  assert fs.basename('/a/b') == 'b'
  assert fs.dirname('gs://b/m/checkpoint_3') == 'gs://b/m'
  assert fs.dirname('gs://bucket') == 'gs://bucket'
  assert fs.dirname('/a/b/') == '/a'
  assert fs.abspath('gs://b/m/') == 'gs://b/m'


def test_abspath_expands_user(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert fs.abspath('~/x') == os.path.join(str(tmp_path), 'x')
  monkeypatch.chdir(tmp_path)
  assert fs.abspath('y') == os.path.join(str(tmp_path), 'y')
  (tmp_path / 'f.txt').write_text('home')
  assert fs.exists('~/f.txt') and fs.isfile('~/f.txt') and fs.read_text('~/f.txt') == 'home'


def test_queries(tmp_path):
  (tmp_path / 'd').mkdir()
  (tmp_path / 'f').write_bytes(b'x')
  assert fs.exists(tmp_path / 'd') and fs.isdir(tmp_path / 'd') and not fs.isfile(tmp_path / 'd')
  assert fs.exists(tmp_path / 'f') and fs.isfile(tmp_path / 'f') and not fs.isdir(tmp_path / 'f')
  missing = tmp_path / 'missing'
  assert not fs.exists(missing) and not fs.isdir(missing) and not fs.isfile(missing)


def test_listdir(tmp_path):
  for name in ('b', 'a', 'c'):
    (tmp_path / name).write_text(name)
  (tmp_path / 'sub').mkdir()
  assert fs.listdir(tmp_path) == ['a', 'b', 'c', 'sub']  # Sorted, no trailing '/'.
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match=f'Cannot list {missing}: the directory does not'):
    fs.listdir(missing)
  assert fs.listdir(missing, missing_ok=True) == []
  with pytest.raises(NotADirectoryError, match='is a file'):
    fs.listdir(tmp_path / 'a')


def test_makedirs_and_rmtree(tmp_path):
  deep = tmp_path / 'a' / 'b' / 'c'
  fs.makedirs(deep)
  fs.makedirs(deep)  # Exists: nothing happens.
  (deep / 'f').write_text('x')
  fs.rmtree(tmp_path / 'a')
  assert not (tmp_path / 'a').exists()
  with pytest.raises(FileNotFoundError, match='does not exist'):
    fs.rmtree(tmp_path / 'a')
  fs.rmtree(tmp_path / 'a', missing_ok=True)
  (tmp_path / 'file').write_text('x')
  fs.rmtree(tmp_path / 'file')  # A file is deleted too.
  assert not (tmp_path / 'file').exists()


def test_write_and_read(tmp_path):
  path = tmp_path / 'data.bin'
  fs.write_bytes(path, b'one')
  assert fs.read_bytes(path) == b'one'
  fs.write_bytes(path, b'two')  # Replaced.
  assert path.read_bytes() == b'two'
  fs.write_text(tmp_path / 't.json', '{"a": 1}')
  assert fs.read_text(tmp_path / 't.json') == '{"a": 1}'
  with fs.open(path, 'rb') as f:
    assert f.read() == b'two'
  assert fs.listdir(tmp_path) == ['data.bin', 't.json']  # No temporary siblings left.
  with pytest.raises(FileNotFoundError):
    fs.read_bytes(tmp_path / 'missing')


def test_write_bytes_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'prompt.npy'
  path.write_bytes(b'old contents')

  def crash(fd):
    del fd
    raise KeyboardInterrupt('killed while writing')

  monkeypatch.setattr(os, 'fsync', crash)
  with pytest.raises(KeyboardInterrupt):
    fs.write_bytes(path, b'new contents that never make it')
  assert path.read_bytes() == b'old contents'
  assert os.listdir(tmp_path) == ['prompt.npy']  # The temporary sibling is removed.


def test_rename_files(tmp_path):
  src, dst = tmp_path / 'src', tmp_path / 'dst'
  src.write_text('new')
  dst.write_text('old')
  with pytest.raises(FileExistsError, match='exists'):
    fs.rename(src, dst)
  assert src.read_text() == 'new' and dst.read_text() == 'old'  # Nothing changed.
  fs.rename(src, dst, overwrite=True)
  assert dst.read_text() == 'new' and not src.exists()
  with pytest.raises(FileNotFoundError, match='does not exist'):
    fs.rename(src, tmp_path / 'other')
  fs.rename(dst, tmp_path / 'moved')
  assert (tmp_path / 'moved').read_text() == 'new'


def test_rename_directory_over_a_full_directory(tmp_path):
  src, dst = tmp_path / 'checkpoint_5.tmp', tmp_path / 'checkpoint_5'
  src.mkdir()
  (src / 'new.txt').write_text('new')
  dst.mkdir()
  (dst / 'old.txt').write_text('old')
  with pytest.raises(FileExistsError):
    fs.rename(src, dst)
  fs.rename(src, dst, overwrite=True)
  assert os.listdir(dst) == ['new.txt']
  assert os.listdir(tmp_path) == ['checkpoint_5']  # The old directory is gone, nothing left over.


def test_rename_directory_failure_restores_the_old_one(tmp_path, monkeypatch):
  src, dst = tmp_path / 'new', tmp_path / 'ckpt'
  src.mkdir()
  (src / 'new.txt').write_text('new')
  dst.mkdir()
  (dst / 'old.txt').write_text('old')
  real_rename = os.rename

  def fail_moving_src_in(a, b):
    if str(a) == str(src):
      raise OSError('disk full')
    real_rename(a, b)

  monkeypatch.setattr(os, 'rename', fail_moving_src_in)
  with pytest.raises(OSError, match='disk full'):
    fs.rename(src, dst, overwrite=True)
  assert os.listdir(dst) == ['old.txt']  # Never lost.
  assert sorted(os.listdir(tmp_path)) == ['ckpt', 'new']


def test_local_paths_never_import_tensorflow(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      from prompt_tuning import fs
      d = fs.join({str(tmp_path)!r}, 'a')
      fs.makedirs(d)
      fs.write_bytes(fs.join(d, 'x'), b'1')
      assert fs.listdir(d) == ['x'] and fs.isfile(fs.join(d, 'x')) and fs.exists(d)
      fs.rename(fs.join(d, 'x'), fs.join(d, 'y'))
      assert fs.read_bytes(fs.join(d, 'y')) == b'1'
      fs.rmtree(d)
      print('TF', 'tensorflow' in sys.modules)
  """)
  proc = subprocess.run(
      [sys.executable, '-c', script],
      env=dict(os.environ, PYTHONPATH=REPO),
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'TF False' in proc.stdout


class FakeGFile:
  """An in-memory stand-in for `tf.io.gfile` (files as bytes; directories implied by paths)."""

  def __init__(self):
    self.files = {}
    self.dirs = set()
    self.calls = []

  def exists(self, path):
    self.calls.append(('exists', path))
    return path in self.files or self.isdir(path)

  def isdir(self, path):
    return path in self.dirs or any(f.startswith(path + '/') for f in self.files)

  def listdir(self, path):
    names = {p[len(path) + 1 :].split('/')[0] for p in list(self.files) + list(self.dirs)}
    return [n + '/' if self.isdir(f'{path}/{n}') else n for n in names if n]

  def makedirs(self, path):
    self.dirs.add(path)

  def rename(self, src, dst, overwrite=False):
    self.calls.append(('rename', src, dst, overwrite))
    self.files[dst] = self.files.pop(src)

  def GFile(self, path, mode):  # pylint: disable=invalid-name
    import io  # pylint: disable=g-import-not-at-top

    fake = self

    class Handle(io.BytesIO):

      def __exit__(self, *args):
        if 'w' in mode:
          fake.files[path] = self.getvalue()
        return super().__exit__(*args)

    return Handle(self.files.get(path, b''))


def test_urls_go_through_gfile(monkeypatch):
  fake = FakeGFile()
  monkeypatch.setattr(fs, '_gfile', lambda: fake)
  fs.makedirs('gs://b/model')
  fs.write_bytes('gs://b/model/ckpt/meta.json', b'{}')
  assert fake.files == {'gs://b/model/ckpt/meta.json': b'{}'}
  assert fs.exists('gs://b/model/ckpt') and fs.isdir('gs://b/model/ckpt')
  assert fs.isfile('gs://b/model/ckpt/meta.json')
  assert fs.listdir('gs://b/model') == ['ckpt']  # Trailing '/' of gfile's directories stripped.
  assert fs.read_bytes('gs://b/model/ckpt/meta.json') == b'{}'
  with pytest.raises(FileNotFoundError, match='gs://b/model/none'):
    fs.open('gs://b/model/none', 'rb')
  fs.rename('gs://b/model/ckpt/meta.json', 'gs://b/model/ckpt/m.json', overwrite=True)
  assert ('rename', 'gs://b/model/ckpt/meta.json', 'gs://b/model/ckpt/m.json', True) in fake.calls
