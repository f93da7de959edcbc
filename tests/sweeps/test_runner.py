"""The runner with stand-in jobs (small Python processes that write what a training run writes).

A stand-in writes `checkpoint_<total>/prompt_tuning_checkpoint.json` (the commit marker a real
checkpoint has) and an evaluation line, so `run_done` reads it as the runtime's own outputs; the
real end-to-end runs are in test_sweep_e2e.py.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from prompt_tuning.sweeps import driver
from prompt_tuning.sweeps import runner
from prompt_tuning.sweeps import spec as spec_lib

METRIC = 'toy/accuracy'

STAND_IN = textwrap.dedent("""
    import json, os, sys, time
    run_dir, mode = sys.argv[1], sys.argv[2]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, 'starts'), 'a') as f:
      f.write(f"{time.time()} {os.environ.get('CUDA_VISIBLE_DEVICES')} {os.getpid()}\\n")
    print('training', run_dir, flush=True)
    if mode.startswith('sleep'):
      time.sleep(float(mode[5:]))
    if mode == 'fail':
      print('ValueError: something the user can fix', flush=True)
      sys.exit(3)
    ckpt = os.path.join(run_dir, 'checkpoint_3')
    os.makedirs(ckpt, exist_ok=True)
    json.dump({'step': 3, 'total_steps': 3}, open(os.path.join(ckpt, 'prompt_tuning_checkpoint.json'), 'w'))
    if mode != 'no_metric':
      os.makedirs(os.path.join(run_dir, 'inference_eval'), exist_ok=True)
      with open(os.path.join(run_dir, 'inference_eval', 'toy-metrics.jsonl'), 'a') as f:
        f.write(json.dumps({'step': 3, 'accuracy': 50.0}) + '\\n')
    """)


def _jobs(tmp_path, modes):
  script = tmp_path / 'stand_in.py'
  script.write_text(STAND_IN)
  sweep = spec_lib.Sweep(name='s', axes={'x': {'X': list(range(len(modes)))}}, seeds=None)
  plan = spec_lib.expand(sweep, str(tmp_path / 'root'))
  jobs = runner.jobs_of(plan)
  for job, mode in zip(jobs, modes):
    job.argv = [sys.executable, str(script), job.runs[0].run_dir, mode]
  return plan, jobs


def _starts(job):
  path = os.path.join(job.runs[0].run_dir, 'starts')
  if not os.path.exists(path):
    return []
  return [line.split() for line in open(path).read().splitlines()]


def _quiet(_):
  pass


def test_finished_runs_are_skipped_and_each_runs_once(tmp_path):
  _, jobs = _jobs(tmp_path, ['ok', 'ok', 'ok'])
  results = runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet, poll_seconds=0.05)
  assert [r.outcome for r in results] == ['done'] * 3
  states = runner.job_states(jobs, METRIC)
  assert [s.state for s in states] == ['done'] * 3 and [s.attempts for s in states] == [1] * 3
  assert runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet) == []
  assert [len(_starts(j)) for j in jobs] == [1, 1, 1]
  log = open(jobs[0].log_path).read()
  assert log.startswith(runner.HEADER) and 'training' in log


def test_a_failure_is_recorded_with_exit_code_and_log_tail_then_retried(tmp_path):
  plan, jobs = _jobs(tmp_path, ['ok', 'fail'])
  plan.save()
  results = runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet, poll_seconds=0.05)
  assert [(r.outcome, r.exit_code) for r in results] == [('done', 0), ('failed', 3)]
  failed = runner.job_states(jobs, METRIC)[1]
  assert failed.state == 'failed' and failed.exit_code == 3 and failed.detail == 'exit code 3'
  assert any('something the user can fix' in l for l in failed.tail)
  text, counts = driver.status_text(plan.root)
  assert counts == {'done': 1, 'failed': 1}
  assert 'x=1' in text and 'something the user can fix' in text
  # Skipping failed runs leaves it; a plain rerun tries it again (the user fixed the cause).
  assert driver.run(plan, {}, {}, skip_failed=True, out=_quiet) == []
  jobs[1].argv[-1] = 'ok'
  results = runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet, poll_seconds=0.05)
  assert [(r.name, r.outcome) for r in results] == [('x=1', 'done')]
  assert runner.job_states(jobs, METRIC)[1].attempts == 2
  assert open(jobs[1].log_path).read().count(runner.HEADER) == 2


def test_a_job_that_cannot_start_is_failed_and_unlocked(tmp_path):
  _, jobs = _jobs(tmp_path, ['ok'])
  jobs[0].argv[0] = str(tmp_path / 'no_such_python')
  (result,) = runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet)
  assert result.outcome == 'failed' and 'could not start' in result.reason
  assert not runner.is_running(jobs[0].job_dir)
  state = runner.job_states(jobs, METRIC)[0]
  assert state.state == 'failed' and state.exit_code == -1


def test_exit_zero_without_the_metric_is_not_done(tmp_path):
  _, jobs = _jobs(tmp_path, ['no_metric'])
  (result,) = runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet, poll_seconds=0.05)
  assert result.outcome == 'failed' and 'did not finish' in result.reason
  assert METRIC in result.reason
  assert runner.job_states(jobs, METRIC)[0].state == 'failed'
  # Without a metric the final checkpoint is enough.
  assert runner.job_states(jobs, None)[0].state == 'done'


def test_a_locked_job_is_never_started_twice(tmp_path):
  _, jobs = _jobs(tmp_path, ['ok'])
  fd = runner.try_lock(jobs[0].job_dir)
  try:
    assert runner.try_lock(jobs[0].job_dir) is None
    assert runner.is_running(jobs[0].job_dir)
    (result,) = runner.run_local(jobs, METRIC, dict(os.environ), out=_quiet)
    assert result.outcome == 'busy' and _starts(jobs[0]) == []
    assert runner.job_states(jobs, METRIC)[0].state == 'running'
  finally:
    runner.unlock(fd)
  assert not runner.is_running(jobs[0].job_dir)


def test_one_run_per_device_at_once(tmp_path):
  _, jobs = _jobs(tmp_path, ['sleep6', 'sleep6'])
  results = runner.run_local(
      jobs, METRIC, dict(os.environ), devices=['3', '5'], out=_quiet, poll_seconds=0.05
  )
  assert [r.outcome for r in results] == ['done', 'done']
  (a,), (b,) = _starts(jobs[0]), _starts(jobs[1])
  assert (a[1], b[1]) == ('3', '5')
  # Started together, not one after the other (which would put 6 s between the starts; a loaded
  # machine takes a while to start a Python process).
  assert abs(float(a[0]) - float(b[0])) < 4.0


def test_progress_eta():
  lines = []
  p = runner.Progress(total_runs=10, already_done=2, parallel=2, out=lines.append)
  assert p.eta() is None
  p.finished(runner.JobResult('a', 'done', seconds=30.0))
  p.finished(runner.JobResult('b', 'done', seconds=90.0, runs=3))  # a vectorized job: 30 s a run
  p.finished(runner.JobResult('c', 'failed'))
  assert p.done == 6 and p.failed == 1
  assert p.eta() == pytest.approx(30.0 * 3 / 2)
  p.report('x')
  assert '6/10 done, 0 running, 1 failed' in lines[-1] and 'ETA 0m45s' in lines[-1]


def test_killing_the_sweep_process_kills_its_run(tmp_path):
  _, jobs = _jobs(tmp_path, ['sleep120'])
  job_json = json.dumps(jobs[0].to_json())
  code = (
      'import json, os, sys; from prompt_tuning.sweeps import runner; '
      f'job = runner.Job.from_json(json.loads({job_json!r})); '
      'runner.run_local([job], None, dict(os.environ))'
  )
  sweep = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while not _starts(jobs[0]) and time.time() < deadline:
      time.sleep(0.1)
    (start,) = _starts(jobs[0])
    child = int(start[2])
    assert runner.is_running(jobs[0].job_dir)
  finally:
    sweep.kill()
    sweep.wait()
  deadline = time.time() + 10
  while time.time() < deadline and _alive(child):
    time.sleep(0.1)
  assert not _alive(child), 'the run outlived the killed sweep process'
  assert not runner.is_running(jobs[0].job_dir)
  assert runner.job_states(jobs, None)[0].state == 'interrupted'


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (dead, not yet reaped by its parent) counts as dead.
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split()[2] != 'Z'
  except OSError:
    return False
