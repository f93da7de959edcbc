"""`launch.tune_malloc`: on request, entry points restart once with an allocator set for XLA.

The restart keeps the PID, the arguments and the environment, adds only the settings the user has
not made, and happens once; the settings really remove the page faults of a large per-call block
(counted with `getrusage`, so a regression shows as a count, not as a timing). The `tcmalloc` tests
need gperftools' library (Debian: `libtcmalloc-minimal4`) and skip without it.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from prompt_tuning.runtime import launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_thp = pytest.mark.skipif(
    not launch.malloc_tunables('hugepages', environ={}),
    reason='not Linux with glibc >= 2.35 and transparent huge pages: tune_malloc does nothing here',
)

needs_tcmalloc = pytest.mark.skipif(
    not sys.platform.startswith('linux') or not launch.find_tcmalloc(),
    reason='no tcmalloc library installed (Debian: apt-get install libtcmalloc-minimal4)',
)

REPORT = textwrap.dedent("""
    import json, os, sys
    from prompt_tuning.runtime import launch
    launch.tune_malloc()
    with open('/proc/self/maps') as f:
      mapped = 'libtcmalloc' in f.read()
    print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:],
                      'tunables': os.environ.get('GLIBC_TUNABLES'),
                      'preload': os.environ.get('LD_PRELOAD'), 'tcmalloc_mapped': mapped,
                      'keep': os.environ.get('KEEP_ME'), 'serves': launch.tcmalloc_loaded()}))
""")

# A jitted call whose temporaries hold a 64 MiB block (a dot's output consumed by another dot).
# XLA frees a call's temporaries just after marking its outputs ready: each call is followed by a
# pause (as the Trainer's `wait_for_step`, longer for a loaded test machine), so the next call finds
# the block freed. Without it a call can win the race and take fresh memory for a second block: the
# tcmalloc case counted 16,386 faults once under the parallel suite's load (not reproduced alone).
FAULTS = textwrap.dedent("""
    import json, os, resource, time
    from prompt_tuning.runtime import launch
    launch.tune_malloc()
    import jax, jax.numpy as jnp
    x = jnp.ones((8192, 256), jnp.float32)
    w1 = jnp.full((256, 2048), 1e-3, jnp.float32)
    w2 = jnp.ones((2048, 8), jnp.float32)
    f = jax.jit(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2)
    def call():
      f(x, w1, w2).block_until_ready()
      time.sleep(0.05)
    call()
    call()
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      call()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({'faults': sorted(faults)[1], 'tunables': os.environ.get('GLIBC_TUNABLES'),
                      'preload': os.environ.get('LD_PRELOAD')}))
""")


def _run(script, tmp_path, env_extra, *args):
  path = tmp_path / 'script.py'
  path.write_text(script)
  env = {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(('GLIBC_TUNABLES', '_PROMPT', 'LD_PRELOAD', 'TCMALLOC_', 'MIMALLOC_'))
  }
  env.pop(launch.MALLOC_ENV, None)
  env.update(env_extra, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(
      [sys.executable, str(path), *args],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return proc.pid, json.loads(out.strip().splitlines()[-1]), err


def test_modes_and_the_users_own_settings():
  assert launch.malloc_tunables('off', environ={}) == {}
  with pytest.raises(ValueError, match='PROMPT_TUNING_MALLOC=.fast. is not a mode.*off, tcmalloc'):
    launch.malloc_tunables('fast', environ={})
  if launch.malloc_tunables('hugepages', environ={}):  # Linux, glibc >= 2.35, huge pages on
    assert launch.malloc_tunables('hugepages', environ={}) == {'glibc.malloc.hugetlb': '1'}
    others = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4:glibc.rtld.nns=2'}
    assert launch.malloc_tunables('hugepages', environ=others) == {'glibc.malloc.hugetlb': '1'}
    mine = {'GLIBC_TUNABLES': 'glibc.rtld.nns=2:glibc.malloc.hugetlb=0'}
    assert launch.malloc_tunables('hugepages', environ=mine) == {}


@needs_thp
def test_restarts_once_with_the_same_pid_arguments_and_environment(tmp_path):
  pid, report, _ = _run(
      REPORT, tmp_path, {'KEEP_ME': 'yes', launch.MALLOC_ENV: 'hugepages'}, '--flag=1', 'positional'
  )
  assert report['pid'] == pid  # re-executed in place, not a child
  assert report['argv'] == ['--flag=1', 'positional']
  assert report['keep'] == 'yes'
  assert report['tunables'] == 'glibc.malloc.hugetlb=1'


@needs_thp
def test_the_users_settings_win_and_off_does_nothing(tmp_path):
  huge = {launch.MALLOC_ENV: 'hugepages'}
  _, report, _ = _run(REPORT, tmp_path, {'GLIBC_TUNABLES': 'glibc.rtld.nns=2', **huge})
  assert report['tunables'] == 'glibc.rtld.nns=2:glibc.malloc.hugetlb=1'
  _, report, _ = _run(REPORT, tmp_path, {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0', **huge})
  assert report['tunables'] == 'glibc.malloc.hugetlb=0'
  _, report, _ = _run(REPORT, tmp_path, {launch.MALLOC_ENV: 'off'})
  assert report['tunables'] is None
  _, report, _ = _run(REPORT, tmp_path, {})  # the default: huge pages cost more on some VMs
  assert report['tunables'] is None


def test_a_bad_mode_is_one_clear_error(tmp_path):
  path = tmp_path / 'script.py'
  path.write_text(REPORT)
  env = dict(os.environ, PYTHONPATH=REPO, **{launch.MALLOC_ENV: 'fast'})
  env.pop('_PROMPT_TUNING_MALLOC_APPLIED', None)
  proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      "ERROR: PROMPT_TUNING_MALLOC='fast' is not a mode: use one of auto, hugepages, mimalloc, "
      'off, tcmalloc.'
  )


@needs_thp
def test_the_settings_remove_the_page_faults_of_a_large_per_call_block(tmp_path):
  _, off, _ = _run(FAULTS, tmp_path, {launch.MALLOC_ENV: 'off'})
  _, huge, _ = _run(FAULTS, tmp_path, {launch.MALLOC_ENV: 'hugepages'})
  assert off['tunables'] is None and huge['tunables'] == 'glibc.malloc.hugetlb=1'
  # 64 MiB touched afresh on every call: at least 16,384 faults of 4 KiB pages without settings,
  # 32 of 2 MiB pages with them (measured: 16,385 against 40-170).
  assert off['faults'] >= 16384, off
  assert huge['faults'] < off['faults'] / 20, (huge, off)


def test_tcmalloc_mode_without_the_library_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(launch, 'find_tcmalloc', lambda: '')
  monkeypatch.setattr(launch, 'find_mimalloc', lambda: '')
  monkeypatch.setattr(sys, 'platform', 'linux')
  with pytest.raises(ValueError) as e:
    launch.malloc_environment('tcmalloc', environ={})
  assert 'PROMPT_TUNING_MALLOC=tcmalloc needs' in str(e.value)
  assert 'apt-get install libtcmalloc-minimal4' in str(e.value)
  with pytest.raises(ValueError) as e:
    launch.malloc_environment('mimalloc', environ={})
  assert 'PROMPT_TUNING_MALLOC=mimalloc needs' in str(e.value)
  assert 'pip install cmeel-mimalloc' in str(e.value)
  assert launch.malloc_environment('off', environ={}) == {}


def test_the_mimalloc_wheel_is_found_on_the_path(monkeypatch, tmp_path):
  import ctypes.util  # pylint: disable=g-import-not-at-top

  lib = tmp_path / 'cmeel.prefix' / 'lib'
  lib.mkdir(parents=True)
  (lib / 'libmimalloc.so.3').write_bytes(b'')
  monkeypatch.setattr(ctypes.util, 'find_library', lambda name: None)  # no system library
  monkeypatch.setattr(sys, 'path', [str(tmp_path / 'elsewhere'), str(tmp_path)])
  assert launch.find_mimalloc() == str(lib / 'libmimalloc.so.3')
  monkeypatch.setattr(sys, 'path', [str(tmp_path / 'elsewhere')])
  assert launch.find_mimalloc() == ''


@needs_tcmalloc
def test_tcmalloc_mode_preloads_the_library_once_and_keeps_the_users_preloads(tmp_path):
  library = launch.find_tcmalloc()
  assert launch.malloc_environment('tcmalloc', environ={}) == {
      'LD_PRELOAD': library,
      'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 50),
      'TCMALLOC_RELEASE_RATE': '0',
  }
  mine = {
      'LD_PRELOAD': 'libfoo.so',
      'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': '4096',
      'TCMALLOC_RELEASE_RATE': '1',
  }
  assert launch.malloc_environment('tcmalloc', environ=mine) == {
      'LD_PRELOAD': f'{library}:libfoo.so'
  }
  assert launch.malloc_environment('tcmalloc', environ={'LD_PRELOAD': library}) == {}
  pid, report, err = _run(
      REPORT, tmp_path, {'KEEP_ME': 'yes', launch.MALLOC_ENV: 'tcmalloc'}, '--flag=1'
  )
  assert report['pid'] == pid and report['argv'] == ['--flag=1'] and report['keep'] == 'yes'
  assert report['preload'] == library and report['tcmalloc_mapped'], report
  assert report['tunables'] is None
  assert 'tcmalloc' not in err, err[-2000:]
  assert report['serves']
  _, report, _ = _run(REPORT, tmp_path, {launch.MALLOC_ENV: 'off'})
  assert report['preload'] is None and not report['tcmalloc_mapped'] and not report['serves']


@needs_tcmalloc
def test_tcmalloc_reuses_a_large_per_call_block(tmp_path):
  _, off, _ = _run(FAULTS, tmp_path, {launch.MALLOC_ENV: 'off'})
  _, tc, _ = _run(FAULTS, tmp_path, {launch.MALLOC_ENV: 'tcmalloc'})
  assert off['preload'] is None and 'tcmalloc' in tc['preload']
  # glibc maps the 64 MiB afresh on every call (16,384 faults); tcmalloc hands out a freed block.
  assert off['faults'] >= 16384, off
  assert tc['faults'] < off['faults'] / 20, (tc, off)


def test_the_compute_entry_points_restart_before_importing_jax():
  """Each calls `tune_malloc()` before `fast_shutdown()` and before anything that imports JAX."""
  for path in (
      'prompt_tuning/train.py',
      'prompt_tuning/eval.py',
      'prompt_tuning/infer.py',
      'prompt_tuning/serve.py',
      'prompt_tuning/sweep.py',
      'prompt_tuning/sweeps/vectorized.py',
      'benchmarks/bench_ours.py',
      'benchmarks/bench_methods.py',
      'benchmarks/ab.py',
      'benchmarks/profile.py',
  ):
    with open(os.path.join(REPO, path)) as f:
      lines = f.read().splitlines()
    calls = [
        i
        for i, line in enumerate(lines)
        if line.strip().startswith(('launch.tune_malloc()', '_launch.tune_malloc()'))
    ]
    shutdowns = [i for i, line in enumerate(lines) if 'fast_shutdown()' in line]
    assert calls and calls[0] < shutdowns[0], path
    # The module-level imports above the first call do not import JAX (else a restart pays twice).
    before = '\n'.join(line for line in lines[: calls[0]] if line.startswith(('import ', 'from ')))
    probe = subprocess.run(
        [sys.executable, '-c', before + "\nimport sys\nprint('jax' in sys.modules)"],
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert probe.returncode == 0, (path, probe.stderr[-2000:])
    assert probe.stdout.strip() == 'False', path


def test_auto_preloads_tcmalloc_where_installed_and_no_allocator_is_chosen(monkeypatch):
  monkeypatch.setattr(sys, 'platform', 'linux')
  monkeypatch.setattr(launch, 'find_tcmalloc', lambda: 'libtcmalloc_minimal.so.4')
  assert launch.malloc_environment('auto', environ={}) == {
      'LD_PRELOAD': 'libtcmalloc_minimal.so.4',
      'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 50),
      'TCMALLOC_RELEASE_RATE': '0',
  }
  assert launch.malloc_environment('auto', environ={'LD_PRELOAD': 'libfoo.so'}) == {
      'LD_PRELOAD': 'libtcmalloc_minimal.so.4:libfoo.so',
      'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 50),
      'TCMALLOC_RELEASE_RATE': '0',
  }
  # The user's own allocator, or their glibc malloc settings, are left as they are.
  for mine in (
      {'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'},
      {'LD_PRELOAD': 'libmimalloc.so'},
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
  ):
    assert launch.malloc_environment('auto', environ=mine) == {}, mine
  assert launch.malloc_environment('off', environ={}) == {}
  # Without tcmalloc, mimalloc where installed (`pip install cmeel-mimalloc`), else glibc's.
  monkeypatch.setattr(launch, 'find_tcmalloc', lambda: '')
  monkeypatch.setattr(launch, 'find_mimalloc', lambda: '/venv/cmeel.prefix/lib/libmimalloc.so.3')
  assert launch.malloc_environment('auto', environ={}) == {
      'LD_PRELOAD': '/venv/cmeel.prefix/lib/libmimalloc.so.3',
      'MIMALLOC_PURGE_DELAY': str(10**9),
      'MIMALLOC_SHOW_WARNINGS': '0',
  }
  monkeypatch.setattr(launch, 'find_mimalloc', lambda: '')
  assert launch.malloc_environment('auto', environ={}) == {}  # glibc's, and no error


@needs_tcmalloc
def test_auto_is_the_default_and_restarts_with_tcmalloc(tmp_path):
  pid, report, err = _run(REPORT, tmp_path, {'KEEP_ME': 'yes'}, '--flag=1')
  assert report['pid'] == pid and report['argv'] == ['--flag=1'] and report['keep'] == 'yes'
  assert report['preload'] == launch.find_tcmalloc() and report['serves'], report
  assert 'tcmalloc' not in err, err[-2000:]
  jemalloc = {'LD_PRELOAD': 'libjemalloc-not-here.so', 'KEEP_ME': 'yes'}
  path = tmp_path / 'script.py'
  env = dict(os.environ, PYTHONPATH=REPO, **jemalloc)
  env.pop(launch.MALLOC_ENV, None)
  out = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True)
  report = json.loads(out.stdout.strip().splitlines()[-1])  # ld.so warns, the run goes on
  assert report['preload'] == 'libjemalloc-not-here.so' and not report['serves']


# Frees memory the allocator cannot hand back by itself: glibc keeps freed runs of small blocks
# between blocks still in use (it trims only the top of the heap); tcmalloc, told not to release
# (rate 0), keeps large spans.
RELEASE = textwrap.dedent("""
    import ctypes, json, sys
    from prompt_tuning.runtime import launch
    launch.tune_malloc()
    def rss():
      with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = int(sys.argv[1]), int(sys.argv[2])
    blocks, kept = [], []
    for i in range(n):
      blocks.append(libc.malloc(size))
      ctypes.memset(blocks[-1], 1, size)
      if i % 64 == 63:  # a small block still in use after every 64
        kept.append(libc.malloc(64))
    for b in blocks:
      libc.free(b)
    before = rss()
    launch.release_free_memory()
    print(json.dumps({'before': before, 'after': rss(), 'tcmalloc': launch.tcmalloc_loaded()}))
""")


def test_release_free_memory_hands_freed_glibc_memory_back(tmp_path):
  _, r, _ = _run(RELEASE, tmp_path, {launch.MALLOC_ENV: 'off'}, '4096', '40000')  # 160 MiB
  assert not r['tcmalloc']
  assert r['before'] - r['after'] > 100, r


@needs_tcmalloc
def test_release_free_memory_hands_freed_tcmalloc_memory_back(tmp_path):
  env = {launch.MALLOC_ENV: 'tcmalloc', 'TCMALLOC_RELEASE_RATE': '0'}
  _, r, _ = _run(RELEASE, tmp_path, env, str(8 << 20), '20')  # 160 MiB in large spans
  assert r['tcmalloc']
  assert r['before'] - r['after'] > 100, r


needs_mimalloc = pytest.mark.skipif(
    not sys.platform.startswith('linux') or not launch.find_mimalloc(),
    reason='no mimalloc library installed (pip install cmeel-mimalloc)',
)


@needs_mimalloc
def test_mimalloc_mode_preloads_it_and_reuses_a_large_per_call_block(tmp_path):
  library = launch.find_mimalloc()
  assert launch.malloc_environment('mimalloc', environ={}) == {
      'LD_PRELOAD': library,
      'MIMALLOC_PURGE_DELAY': str(10**9),
      'MIMALLOC_SHOW_WARNINGS': '0',
  }
  assert launch.malloc_environment('mimalloc', environ={'LD_PRELOAD': library}) == {}
  _, off, _ = _run(FAULTS, tmp_path, {launch.MALLOC_ENV: 'off'})
  _, mi, _ = _run(FAULTS, tmp_path, {launch.MALLOC_ENV: 'mimalloc'})
  assert mi['preload'] == library
  # glibc maps the 64 MiB afresh on every call (16,384 faults); mimalloc, told to keep freed
  # memory, hands the block out again.
  assert off['faults'] >= 16384, off
  assert mi['faults'] < off['faults'] / 20, (mi, off)


@needs_mimalloc
def test_release_free_memory_hands_freed_mimalloc_memory_back(tmp_path):
  script = RELEASE.replace(
      "'tcmalloc': launch.tcmalloc_loaded()", "'mimalloc': launch.mimalloc_loaded()"
  )
  _, r, _ = _run(script, tmp_path, {launch.MALLOC_ENV: 'mimalloc'}, str(8 << 20), '20')
  assert r['mimalloc']
  # Kept by the purge delay until asked: `mi_collect(true)` hands it back.
  assert r['before'] > 150 and r['before'] - r['after'] > 100, r
