"""Run state on disk, the execution of one job, the local executor and progress.

A *job* is what one process executes: one run (`python -m prompt_tuning.train ...`), or one
vectorized group of runs (`python -m prompt_tuning.sweeps.vectorized JOB.json`). Whether a run is
finished is read from what the runtime itself writes, never from a separate record:

* a training run is **done** when its latest complete checkpoint is at the `total_steps` recorded
  in it and, when the sweep has a metric, the run's evaluation logged that metric at that step;
* an evaluation run (`prompt_tuning.eval`) is done when its `metrics.json` exists.

So rerunning a sweep skips finished runs and restarts the others, which resume from their last
checkpoint (the runtime resumes from `MODEL_DIR`), and runs started by `--print_commands` lines
count the same. While a job runs it holds an exclusive lock on `JOB_DIR/.sweep.lock` (inherited by
its process, which dies with the sweep process): a second sweep process, or a rerun after the
first was killed, never runs the same job twice at once. Each attempt appends to the job's log
(`RUN_DIR/train.log`) after a header line, and records its exit status and the log's tail in
`JOB_DIR/sweep_status.json`.
"""

import dataclasses
import fcntl
import json
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from prompt_tuning import fs
from prompt_tuning.sweeps import collect
from prompt_tuning.sweeps import spec as spec_lib

STATUS_FILE = 'sweep_status.json'
LOCK_FILE = '.sweep.lock'
JOB_FILE = 'job.json'
HEADER = '=== sweep attempt'
TAIL_LINES = 30


@dataclasses.dataclass
class Job:
  """What one process executes: a run, or a vectorized group of runs."""

  name: str
  runs: List[spec_lib.Run]
  argv: List[str]
  job_dir: str  # holds the lock and the status file
  log_path: str
  group: Optional[str] = None

  def to_json(self) -> Dict[str, Any]:
    return {
        'name': self.name,
        'runs': [r.to_json() for r in self.runs],
        'argv': self.argv,
        'job_dir': self.job_dir,
        'log_path': self.log_path,
        'group': self.group,
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'Job':
    d = dict(d)
    d['runs'] = [spec_lib.Run.from_json(r) for r in d['runs']]
    return cls(**d)


def jobs_of(plan: spec_lib.Plan, python: Optional[str] = None) -> List[Job]:
  """The plan's jobs, in the plan's order (a vectorized group where its first run is)."""
  python = python or sys.executable
  groups = plan.groups()
  jobs, seen = [], set()
  for run in plan.runs:
    if run.group:
      if run.group in seen:
        continue
      seen.add(run.group)
      job_dir = plan.group_dir(run.group)
      argv = [python, '-m', 'prompt_tuning.sweeps.vectorized', fs.join(job_dir, JOB_FILE)]
      jobs.append(
          Job(
              name=f'{spec_lib.VECTORIZED_DIR}/{run.group}',
              runs=groups[run.group],
              argv=argv,
              job_dir=job_dir,
              log_path=fs.join(job_dir, 'train.log'),
              group=run.group,
          )
      )
    else:
      jobs.append(
          Job(
              name=run.name,
              runs=[run],
              argv=run.argv(python),
              job_dir=run.run_dir,
              log_path=fs.join(run.run_dir, run.log_name),
          )
      )
  return jobs


def write_group_files(plan: spec_lib.Plan) -> None:
  """`ROOT/vectorized/<group>/job.json`: the member runs a vectorized job trains."""
  for group, runs in plan.groups().items():
    job_dir = plan.group_dir(group)
    fs.makedirs(job_dir)
    members = [
        {
            'name': r.name,
            'run_dir': r.run_dir,
            'gin_files': r.gin_files,
            'bindings': [list(b) for b in r.bindings],
            'flags': r.flags,
        }
        for r in runs
    ]
    fs.write_text(fs.join(job_dir, JOB_FILE), json.dumps({'group': group, 'members': members}))


# ------------------------------------------------------------------------------------------ state


def run_done(run: spec_lib.Run, metric: Optional[str]) -> (bool, str):
  """Whether `run` is finished (from its own outputs), and a short description of where it is."""
  if run.entry == 'prompt_tuning.eval':
    if fs.exists(fs.join(run.run_dir, 'metrics.json')):
      return True, 'evaluated'
    return False, 'not evaluated'
  from prompt_tuning.checkpoints import orbax_format  # pylint: disable=g-import-not-at-top

  latest = orbax_format.latest_checkpoint_path(run.run_dir)
  if latest is None:
    return False, 'no checkpoint'
  meta = orbax_format.read_metadata(latest)
  step, total = meta.get('step'), meta.get('total_steps')
  if step is None or total is None or int(step) < int(total):
    return False, f'step {step}/{total}'
  metric = spec_lib.run_metric(metric, run)
  if metric:
    metrics = collect.read_metrics(run.run_dir)
    try:
      found = collect.metric_value(metrics, metric, 'final')
    except ValueError as e:
      return False, str(e)
    if found is None or found[0] < int(step):
      return False, f'step {step}/{total}, {metric} not logged at step {step}'
  return True, f'step {step}/{total}'


def try_lock(job_dir: str) -> Optional[int]:
  """An exclusive lock on the job (a file descriptor), or None when another process holds it."""
  fs.makedirs(job_dir)
  fd = os.open(os.path.join(job_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    return None
  return fd


def unlock(fd: int) -> None:
  try:
    fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


def is_running(job_dir: str) -> bool:
  """Whether some process holds the job's lock now."""
  if not os.path.exists(os.path.join(job_dir, LOCK_FILE)):
    return False
  fd = try_lock(job_dir)
  if fd is None:
    return True
  unlock(fd)
  return False


def read_status(job_dir: str) -> Dict[str, Any]:
  path = fs.join(job_dir, STATUS_FILE)
  if not fs.exists(path):
    return {}
  try:
    return json.loads(fs.read_text(path))
  except (ValueError, OSError):
    return {}


def _write_status(job_dir: str, status: Mapping[str, Any]) -> None:
  fs.write_text(fs.join(job_dir, STATUS_FILE), json.dumps(status, indent=1))


def log_tail(path: str, lines: int = TAIL_LINES) -> List[str]:
  try:
    with open(path, 'rb') as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - 64 * 1024))
      text = f.read().decode('utf-8', 'replace')
  except OSError:
    return []
  return text.splitlines()[-lines:]


@dataclasses.dataclass
class RunState:
  run: spec_lib.Run
  job: Job
  state: str  # done | running | failed | interrupted | pending
  detail: str
  attempts: int
  exit_code: Optional[int]
  tail: List[str]


def job_states(jobs: Sequence[Job], metric: Optional[str]) -> List[RunState]:
  """The state of every run of `jobs`."""
  out = []
  for job in jobs:
    running = is_running(job.job_dir)
    status = read_status(job.job_dir)
    attempts = status.get('attempts', [])
    last = attempts[-1] if attempts else {}
    for run in job.runs:
      done, detail = run_done(run, metric)
      if done:
        state = 'done'
      elif running:
        state = 'running'
      elif last.get('exit_code') not in (None, 0) or last.get('unfinished'):
        state = 'failed'
      elif fs.exists(job.log_path) or fs.exists(run.run_dir):
        state = 'interrupted'
      else:
        state = 'pending'
      out.append(
          RunState(
              run=run,
              job=job,
              state=state,
              detail=last.get('reason', detail) if state == 'failed' else detail,
              attempts=len(attempts),
              exit_code=last.get('exit_code'),
              tail=last.get('tail', []) if state == 'failed' else [],
          )
      )
  return out


# ------------------------------------------------------------------------------------------ execution


def _die_with_parent() -> None:
  """In the child: SIGKILL when the sweep process dies (Linux), so no run is left behind running."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top

    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


@dataclasses.dataclass
class JobResult:
  name: str
  outcome: str  # done | failed | skipped | busy
  seconds: float = 0.0
  exit_code: Optional[int] = None
  reason: str = ''
  runs: int = 1


class Attempt:
  """One attempt at a job: lock, log header, the process, and the status record when it ends."""

  def __init__(
      self, job: Job, metric: Optional[str], env: Mapping[str, str], cwd: Optional[str] = None
  ):
    self.job, self.metric, self.env, self.cwd = job, metric, dict(env), cwd
    self.proc = None
    self._fd = None
    self._log = None
    self.start_time = 0.0

  def start(self) -> Optional[JobResult]:
    """Starts the process; returns a result right away when there is nothing to run."""
    self._fd = try_lock(self.job.job_dir)
    if self._fd is None:
      return JobResult(self.job.name, 'busy', reason='another process holds its lock')
    if all(run_done(r, self.metric)[0] for r in self.job.runs):
      unlock(self._fd)
      return JobResult(self.job.name, 'skipped', runs=len(self.job.runs))
    for r in self.job.runs:
      fs.makedirs(r.run_dir)
    status = read_status(self.job.job_dir)
    attempts = status.get('attempts', [])
    self.start_time = time.time()
    attempts.append(
        {
            'start': self.start_time,
            'host': socket.gethostname(),
            'pid': os.getpid(),
            'argv': self.job.argv,
            'cuda_visible_devices': self.env.get('CUDA_VISIBLE_DEVICES'),
        }
    )
    self._status = {'job': self.job.name, 'attempts': attempts}
    _write_status(self.job.job_dir, self._status)
    self._log = open(self.job.log_path, 'ab')  # pylint: disable=consider-using-with
    header = (
        f'{HEADER} {len(attempts)} of {self.job.name} on {socket.gethostname()} at '
        f'{time.strftime("%Y-%m-%d %H:%M:%S")} ===\n$ {" ".join(self.job.argv)}\n'
    )
    self._log.write(header.encode())
    self._log.flush()
    try:
      self.proc = subprocess_popen(
          self.job.argv, self._log, self.env, self.cwd, pass_fds=(self._fd,)
      )
    except OSError as e:  # e.g. no such interpreter or working directory on this node
      reason = f'could not start: {type(e).__name__}: {e}'
      self._log.write(f'{reason}\n'.encode())
      self._log.close()
      self._status['attempts'][-1].update({'end': time.time(), 'exit_code': -1, 'reason': reason})
      _write_status(self.job.job_dir, self._status)
      unlock(self._fd)
      return JobResult(
          self.job.name, 'failed', exit_code=-1, reason=reason, runs=len(self.job.runs)
      )
    return None

  def poll(self) -> Optional[int]:
    return self.proc.poll()

  def finish(self) -> JobResult:
    code = self.proc.wait()
    seconds = time.time() - self.start_time
    self._log.close()
    states = [run_done(r, self.metric) for r in self.job.runs]
    done = all(d for d, _ in states)
    record = self._status['attempts'][-1]
    record.update({'end': time.time(), 'seconds': seconds, 'exit_code': code})
    reason = ''
    if not done:
      record['tail'] = log_tail(self.job.log_path)
      if code == 0:
        detail = '; '.join(f'{r.name}: {d}' for r, (ok, d) in zip(self.job.runs, states) if not ok)
        reason = (
            f'exited 0 but did not finish ({detail}); the sweep metric {self.metric!r} must be '
            "logged by the runs' inference evaluation at their last step"
            if self.metric
            else f'exited 0 but did not finish ({detail})'
        )
        record['unfinished'] = True
      else:
        reason = f'exit code {code}'
      record['reason'] = reason
    _write_status(self.job.job_dir, self._status)
    unlock(self._fd)
    return JobResult(
        self.job.name,
        'done' if done else 'failed',
        seconds,
        code,
        reason,
        runs=len(self.job.runs),
    )

  def kill(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.kill()


def subprocess_popen(argv, log, env, cwd, pass_fds=()):
  import subprocess  # pylint: disable=g-import-not-at-top

  return subprocess.Popen(  # pylint: disable=consider-using-with
      list(argv),
      stdout=log,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      env=dict(env),
      cwd=cwd,
      pass_fds=tuple(pass_fds),
      preexec_fn=_die_with_parent,
  )


def execute(
    job: Job, metric: Optional[str], env: Mapping[str, str], cwd: Optional[str] = None
) -> JobResult:
  """Runs one job to its end (the Ray executor's task)."""
  attempt = Attempt(job, metric, env, cwd)
  early = attempt.start()
  if early is not None:
    return early
  try:
    return attempt.finish()
  except BaseException:
    attempt.kill()
    raise


# ------------------------------------------------------------------------------------------ progress


def _fmt_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Counts runs done / running / failed and estimates the time left from the jobs finished."""

  def __init__(
      self,
      total_runs: int,
      already_done: int,
      parallel: int,
      out: Callable[[str], None] = print,
  ):
    self.total, self.done, self.failed, self.running = total_runs, already_done, 0, 0
    self.parallel = max(1, parallel)
    self.durations: List[float] = []  # seconds per run of the jobs finished in this process
    self.out = out
    self.t0 = time.time()
    self.last_print = 0.0

  def eta(self) -> Optional[float]:
    if not self.durations:
      return None
    left = self.total - self.done - self.failed
    per_run = sum(self.durations) / len(self.durations)
    return per_run * left / self.parallel

  def line(self) -> str:
    eta = self.eta()
    eta_text = _fmt_seconds(eta) if eta is not None else '?'
    return (
        f'[sweep] {self.done}/{self.total} done, {self.running} running, {self.failed} failed | '
        f'elapsed {_fmt_seconds(time.time() - self.t0)}, ETA {eta_text}'
    )

  def report(self, event: str = '', force: bool = True) -> None:
    now = time.time()
    if force or now - self.last_print > 60:
      self.out((f'{event}\n' if event else '') + self.line())
      self.last_print = now

  def finished(self, result: JobResult) -> None:
    if result.outcome == 'done':
      self.done += result.runs
      self.durations += [result.seconds / max(result.runs, 1)] * result.runs
    elif result.outcome == 'failed':
      self.failed += result.runs
    elif result.outcome == 'skipped':
      self.done += result.runs


def count_done(jobs: Sequence[Job], metric: Optional[str]) -> int:
  return sum(1 for j in jobs for r in j.runs if run_done(r, metric)[0])


def run_local(
    jobs: Sequence[Job],
    metric: Optional[str],
    env: Mapping[str, str],
    *,
    cwd: Optional[str] = None,
    parallel: int = 1,
    devices: Optional[Sequence[str]] = None,
    out: Callable[[str], None] = print,
    poll_seconds: float = 0.5,
) -> List[JobResult]:
  """Runs the jobs that are not done, `parallel` at a time (one device each with `devices`).

  With `devices` (e.g. `['0', '1', '2', '3']`) there is one slot per device and each job sees
  only its device (`CUDA_VISIBLE_DEVICES`); otherwise `parallel` slots share the machine.
  """
  slots: List[Optional[str]] = list(devices) if devices else [None] * max(1, parallel)
  total = sum(len(j.runs) for j in jobs)
  todo = [j for j in jobs if not all(run_done(r, metric)[0] for r in j.runs)]
  progress = Progress(total, total - sum(len(j.runs) for j in todo), len(slots), out)
  progress.report(f'[sweep] {len(todo)} of {len(jobs)} jobs to run ({total} runs in all)')
  results: List[JobResult] = []
  running: Dict[int, Attempt] = {}
  queue = list(todo)
  try:
    while queue or running:
      for slot, device in enumerate(slots):
        if slot in running or not queue:
          continue
        job = queue.pop(0)
        job_env = dict(env)
        if device is not None:
          job_env['CUDA_VISIBLE_DEVICES'] = str(device)
        attempt = Attempt(job, metric, job_env, cwd)
        early = attempt.start()
        if early is not None:
          results.append(early)
          progress.finished(early)
          progress.report(f'[sweep] {early.outcome}: {job.name} ({early.reason or "finished"})')
          continue
        running[slot] = attempt
        progress.running += len(job.runs)
        where = f' on device {device}' if device is not None else ''
        progress.report(f'[sweep] started {job.name}{where}: log {job.log_path}')
      for slot, attempt in list(running.items()):
        if attempt.poll() is None:
          continue
        del running[slot]
        result = attempt.finish()
        progress.running -= len(attempt.job.runs)
        results.append(result)
        progress.finished(result)
        if result.outcome == 'done':
          event = f'[sweep] done: {result.name} in {_fmt_seconds(result.seconds)}'
        else:
          tail = '\n'.join('    ' + l for l in log_tail(attempt.job.log_path, 8))
          event = f'[sweep] FAILED: {result.name} ({result.reason}); log tail:\n{tail}'
        progress.report(event)
      if running:
        progress.report(force=False)
        time.sleep(poll_seconds)
  finally:
    for attempt in running.values():
      attempt.kill()
  progress.report('[sweep] finished this pass')
  return results
