"""End to end: a 2x2 sweep of 3-step prompt-tuning runs through `python -m prompt_tuning.sweep`.

One sweep (learning rate x seed, tiny model, `tiny_count`) is run four ways, and each must give the
same collected numbers:

* locally, with the sweep process killed (-9) during its second run and the command rerun: every
  run completes exactly once (the interrupted one resumes, the finished ones are not rerun);
* from `--print_commands` lines run one by one in a shell (same run directories);
* on a local Ray instance (2 CPUs);
* vectorized: the four runs trained as one job (K = 4), each run's losses and prompt equal to its
  separate run's within 1e-5.

`collect`'s means and standard deviations are checked against a hand computation over the runs'
metric files. Runs share a JAX compilation cache, so only the first compiles.
"""

import glob
import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

import sweep_testlib as st
from prompt_tuning.sweeps import runner

rt = st.rt
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  base = tmp_path_factory.mktemp('sweep_e2e')
  checkpoint = rt.make_t5x_checkpoint(str(base))
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  spec = base / 'spec.gin'
  spec.write_text(st.tiny_spec('tiny'))
  return {'base': base, 'checkpoint': checkpoint, 'env': env, 'spec': str(spec)}


def _cli(setup, *args, timeout=900):
  return rt.run(st.sweep_args(*args), setup['env'], timeout=timeout)


def _run_args(setup, root, *extra):
  return ('run', setup['spec'], '--root', str(root), *st.macro_flags(setup['checkpoint']), *extra)


def _final_metric(run_dir):
  """The last logged value of the sweep metric, read directly from the run's JSON lines."""
  path = os.path.join(run_dir, 'inference_eval', 'tiny_count-metrics.jsonl')
  lines = [json.loads(l) for l in open(path).read().splitlines() if l.strip()]
  return lines[-1]['step'], lines[-1]['log_likelihood']


def _collected(setup, root):
  proc = _cli(setup, 'collect', '--root', str(root))
  rt.check_ok(proc, 'collect')
  with open(os.path.join(root, 'collected', 'results.json')) as f:
    return json.load(f)


def _values(collected):
  return {r['run']: r['value'] for r in collected['runs']}


@pytest.fixture(scope='module')
def local_root(setup):
  """The sweep run locally, its sweep process killed with -9 during the second run, then rerun."""
  root = setup['base'] / 'local'
  names = ['lr=0.1,seed=0', 'lr=0.1,seed=1', 'lr=0.3,seed=0', 'lr=0.3,seed=1']
  second_log = os.path.join(root, names[1], 'train.log')
  log = str(setup['base'] / 'local_first.log')
  proc = rt.popen_logged(st.sweep_args(*_run_args(setup, root)), setup['env'], log)
  try:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(second_log) and runner.HEADER in open(second_log).read():
        break
      time.sleep(0.2)
    assert proc.poll() is None, open(log).read()[-4000:]
    time.sleep(3)  # the second run's process is under way
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    rt.finish_logged(proc, timeout=30)
  # The run dies with the sweep process: its lock is released, nothing keeps writing.
  deadline = time.time() + 30
  while runner.is_running(os.path.join(root, names[1])) and time.time() < deadline:
    time.sleep(0.2)
  assert not runner.is_running(os.path.join(root, names[1]))
  status = _cli(setup, 'status', '--root', str(root))
  assert status.returncode == 1
  assert 'interrupted' in status.stdout and 'pending' in status.stdout, status.stdout
  rerun = _cli(setup, *_run_args(setup, root))
  rt.check_ok(rerun, 'the rerun of the sweep')
  assert 'all 4 runs done' in rerun.stdout
  return root, names


@pytest.fixture(scope='module')
def local_collected(setup, local_root):
  """`collect` over the local sweep, once (the Ray and vectorized sweeps compare against it)."""
  return _collected(setup, local_root[0])


def test_killed_sweep_reruns_complete_every_run_exactly_once(setup, local_root):
  root, names = local_root
  attempts = [open(os.path.join(root, n, 'train.log')).read().count(runner.HEADER) for n in names]
  # The first run finished before the kill and was not run again; the second was interrupted and
  # resumed; the last two ran once, after the rerun.
  assert attempts == [1, 2, 1, 1], attempts
  for n in names:
    run_dir = os.path.join(root, n)
    assert sorted(os.listdir(os.path.join(run_dir, 'numpy_checkpoints'))) == ['checkpoint_3']
    assert _final_metric(run_dir)[0] == 3
    lines = open(os.path.join(run_dir, 'inference_eval', 'tiny_count-metrics.jsonl')).readlines()
    assert len(lines) == 1, f'{n} was evaluated {len(lines)} times'
  status = _cli(setup, 'status', '--root', str(root))
  assert status.returncode == 0 and 'done: 4' in status.stdout


def test_collect_equals_a_hand_computation(local_root, local_collected):
  root, names = local_root
  collected = local_collected
  assert collected['metric'] == st.METRIC
  assert _values(collected) == {n: _final_metric(os.path.join(root, n))[1] for n in names}
  by_lr = {s['lr']: s for s in collected['settings']}
  for lr in ('0.1', '0.3'):
    values = [_final_metric(os.path.join(root, f'lr={lr},seed={s}'))[1] for s in (0, 1)]
    mean = (values[0] + values[1]) / 2
    std = math.sqrt(((values[0] - mean) ** 2 + (values[1] - mean) ** 2) / (2 - 1))
    assert by_lr[lr]['mean'] == pytest.approx(mean, rel=1e-12)
    assert by_lr[lr]['std'] == pytest.approx(std, rel=1e-9)
    assert by_lr[lr]['n'] == 2
  table = open(os.path.join(root, 'collected', 'results.md')).read()
  s = by_lr['0.1']
  assert f"| 0.1 | {s['mean']:.2f} ± {s['std']:.2f} | 2/2 |" in table
  assert os.path.getsize(os.path.join(root, 'collected', 'results.png')) > 1000


def _layout(run_dir):
  """What a run directory holds, without names that differ between processes (events, orbax)."""
  out = set()
  for path in glob.glob(os.path.join(run_dir, '**'), recursive=True):
    rel = os.path.relpath(path, run_dir)
    top = rel.split(os.sep)[0]
    if top in (runner.STATUS_FILE, runner.LOCK_FILE) or rel == '.':
      continue
    if 'events.out.tfevents' in rel or (top.startswith('checkpoint_') and os.sep in rel):
      continue
    out.add(rel)
  return out


def test_printed_commands_make_the_same_run_directories(setup, local_root):
  root, names = local_root
  chosen = [names[0], names[3]]
  commands = setup['base'] / 'commands.sh'
  printed = setup['base'] / 'printed'
  proc = _cli(
      setup, *_run_args(setup, printed, '--print_commands', str(commands), '--only', *chosen)
  )
  rt.check_ok(proc, '--print_commands')
  lines = commands.read_text().splitlines()
  assert len(lines) == 2 and all('-m prompt_tuning.train' in l for l in lines)
  assert not any(os.path.exists(os.path.join(printed, n)) for n in chosen)  # nothing ran yet
  for line in lines:
    done = subprocess.run(['bash', '-c', line], env=setup['env'], timeout=600, check=False)
    assert done.returncode == 0
  status = _cli(setup, 'status', '--root', str(printed))
  assert status.returncode == 0 and 'done: 2' in status.stdout, status.stdout
  for n in chosen:
    assert _layout(os.path.join(printed, n)) == _layout(os.path.join(root, n))
    assert _final_metric(os.path.join(printed, n)) == pytest.approx(
        _final_metric(os.path.join(root, n)), rel=1e-6
    )


def test_ray_gives_the_same_numbers(setup, local_root, local_collected):
  root, names = local_root
  ray_root = setup['base'] / 'ray'
  proc = _cli(setup, *_run_args(setup, ray_root, '--executor', 'ray', '--ray_num_cpus', '2'))
  rt.check_ok(proc, 'the sweep on Ray')
  assert 'all 4 runs done' in proc.stdout
  local, on_ray = _values(local_collected), _values(_collected(setup, ray_root))
  assert set(on_ray) == set(names)
  for n in names:
    assert on_ray[n] == pytest.approx(local[n], rel=1e-6)


def test_vectorized_sweep_equals_the_separate_runs(setup, local_root, local_collected):
  root, names = local_root
  spec = setup['base'] / 'vectorized.gin'
  spec.write_text(st.tiny_spec('tiny', extra="  vectorize = ['lr', 'seed']\n"))
  vec_root = setup['base'] / 'vectorized'
  args = ('run', str(spec), '--root', str(vec_root), *st.macro_flags(setup['checkpoint']))
  proc = _cli(setup, *args)
  rt.check_ok(proc, 'the vectorized sweep')
  assert '1 of 1 jobs to run (4 runs in all)' in proc.stdout
  log = open(os.path.join(vec_root, 'vectorized', 'all', 'train.log')).read()
  assert log.count(runner.HEADER) == 1 and 'Vectorized job all: 4 runs' in log
  separate, vectorized = _values(local_collected), _values(_collected(setup, vec_root))
  for n in names:
    assert vectorized[n] == pytest.approx(separate[n], rel=1e-5, abs=1e-5)
    rt.assert_losses_close(
        rt.losses(os.path.join(vec_root, n)),
        rt.losses(os.path.join(root, n)),
        [1, 2, 3],
        1e-5,
        1e-5,
    )
    (a,) = glob.glob(os.path.join(vec_root, n, 'numpy_checkpoints', 'checkpoint_3', '*.npy'))
    (b,) = glob.glob(os.path.join(root, n, 'numpy_checkpoints', 'checkpoint_3', '*.npy'))
    np.testing.assert_allclose(np.load(a), np.load(b), rtol=1e-5, atol=1e-5)
  # Different seeds started from different prompts, different learning rates went different ways.
  assert len({round(v, 6) for v in vectorized.values()}) == 4


def test_an_invalid_spec_fails_before_any_run(setup):
  spec = setup['base'] / 'invalid.gin'
  spec.write_text(st.tiny_spec('tiny', bindings={'utils.SaveCheckpointConfig.periodd': 3}))
  root = setup['base'] / 'invalid'
  proc = _cli(setup, 'run', str(spec), '--root', str(root), *st.macro_flags(setup['checkpoint']))
  tail = rt.assert_clean_error(proc, 'lr=0.1,seed=0', 'periodd', 'nothing was started')
  assert proc.returncode == 2, tail
  assert not root.exists() or not os.listdir(root)
