"""What `python -m prompt_tuning.sweep` does: plan, check, run, print commands, status, collect."""

import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from prompt_tuning import fs
from prompt_tuning.sweeps import collect
from prompt_tuning.sweeps import runner
from prompt_tuning.sweeps import spec as spec_lib

SpecError = spec_lib.SpecError
CACHE_DIR = 'jax_cache'


def plan_from_spec(
    spec_path: str,
    root: str,
    bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    only: Sequence[str] = (),
) -> spec_lib.Plan:
  """Loads the spec (with `NAME = VALUE` bindings of its macros) and expands it under `root`."""
  sweep = spec_lib.load_sweep(spec_path, bindings, search_paths)
  plan = spec_lib.expand(sweep, root)
  if only:
    unknown = [n for n in only if n not in {r.name for r in plan.runs}]
    if unknown:
      raise SpecError(f'--only names no run of the sweep: {unknown}.')
    keep = set(only)
    plan.runs = [r for r in plan.runs if r.name in keep or (r.group and _group_has(plan, r, keep))]
  return plan


def _group_has(plan: spec_lib.Plan, run: spec_lib.Run, names) -> bool:
  return any(r.name in names for r in plan.groups()[run.group])


def run_env_overrides(root: str, environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """Environment variables every run gets: a JAX compilation cache shared by the sweep's runs."""
  environ = os.environ if environ is None else environ
  out = {}
  if not environ.get('JAX_COMPILATION_CACHE_DIR'):
    out['JAX_COMPILATION_CACHE_DIR'] = fs.join(fs.abspath(root), CACHE_DIR)
  return out


def check_plan(
    plan: spec_lib.Plan,
    env: Mapping[str, str],
    cwd: Optional[str] = None,
    python: Optional[str] = None,
) -> None:
  """Parses every run's gin configuration in a subprocess (as the runs will); raises SpecError."""
  with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
    json.dump(plan.to_json(), f)
    path = f.name
  try:
    proc = subprocess.run(
        [python or sys.executable, '-m', 'prompt_tuning.sweeps.check', path],
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
  finally:
    os.unlink(path)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('SWEEP_CHECK ')]
  if not lines:
    raise SpecError(
        "Checking the runs' gin configurations failed (exit code "
        f'{proc.returncode}):\n' + '\n'.join(proc.stdout.splitlines()[-20:])
    )
  problems = json.loads(lines[-1][len('SWEEP_CHECK ') :])
  if problems:
    raise SpecError(
        f'The sweep {plan.name!r} has {len(problems)} invalid run configuration(s); nothing was '
        'started:\n' + '\n'.join('  ' + p for p in problems)
    )


def prepare(
    plan: spec_lib.Plan,
    env: Mapping[str, str],
    *,
    cwd: Optional[str] = None,
    python: Optional[str] = None,
    check: bool = True,
) -> None:
  """Validates the plan, then saves it (`ROOT/sweep.json`) and the vectorized jobs' files.

  Raises:
    SpecError: a run's configuration is invalid, or a run already under the root was made with
      other settings (use a new root, or delete that run's directory).
  """
  path = fs.join(plan.root, spec_lib.PLAN_FILE)
  if fs.exists(path):
    old = spec_lib.load_plan(plan.root)
    old_runs = {r.name: r for r in old.runs}
    changed = [
        r.name
        for r in plan.runs
        if r.name in old_runs and old_runs[r.name].fingerprint() != r.fingerprint()
    ]
    if changed:
      raise SpecError(
          f'{len(changed)} run(s) under {plan.root} were started with other settings than the '
          f'spec gives now: {changed[:5]}. Use another --root, or delete those run directories '
          'to rerun them with the new settings.'
      )
    if old.name != plan.name:
      raise SpecError(
          f'{plan.root} holds the sweep {old.name!r}, not {plan.name!r}: use another --root.'
      )
  if check:
    check_plan(plan, env, cwd, python)
  plan.save()
  runner.write_group_files(plan)


def shell_commands(
    plan: spec_lib.Plan,
    env_overrides: Mapping[str, str],
    cwd: Optional[str] = None,
    python: Optional[str] = None,
) -> List[str]:
  """One shell line per job: the same process, log and directory as `run` gives it."""
  cwd = cwd or os.getcwd()
  lines = []
  for job in runner.jobs_of(plan, python):
    env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in env_overrides.items())
    command = ' '.join(shlex.quote(a) for a in job.argv)
    lines.append(
        f'mkdir -p {shlex.quote(job.job_dir)} && cd {shlex.quote(cwd)} && '
        + (f'env {env} ' if env else '')
        + f'{command} >> {shlex.quote(job.log_path)} 2>&1'
    )
  return lines


def run(
    plan: spec_lib.Plan,
    env: Mapping[str, str],
    env_overrides: Mapping[str, str],
    *,
    executor: str = 'local',
    cwd: Optional[str] = None,
    python: Optional[str] = None,
    parallel: int = 1,
    devices: Optional[Sequence[str]] = None,
    ray_address: Optional[str] = None,
    ray_num_cpus: Optional[int] = None,
    skip_failed: bool = False,
    out: Callable[[str], None] = print,
) -> List[runner.JobResult]:
  """Executes the jobs of a prepared plan that are not done."""
  metric = plan.sweep.get('metric')
  jobs = runner.jobs_of(plan, python)
  if skip_failed:
    failed = {s.job.name for s in runner.job_states(jobs, metric) if s.state == 'failed'}
    if failed:
      out(f'[sweep] skipping {len(failed)} failed job(s) (--skip_failed): {sorted(failed)[:5]}')
    jobs = [j for j in jobs if j.name not in failed]
  run_env = dict(env)
  run_env.update(env_overrides)
  if executor == 'local':
    return runner.run_local(
        jobs, metric, run_env, cwd=cwd, parallel=parallel, devices=devices, out=out
    )
  if executor == 'ray':
    from prompt_tuning.sweeps import ray_executor  # pylint: disable=g-import-not-at-top

    return ray_executor.run_ray(
        jobs,
        metric,
        env_overrides,
        cwd=cwd,
        address=ray_address,
        num_cpus=ray_num_cpus,
        resources=plan.sweep.get('resources'),
        out=out,
    )
  raise ValueError(f"Unknown executor {executor!r}: use 'local' or 'ray'.")


def status_text(root: str) -> (str, Dict[str, int]):
  """A table of every run's state, with the log tail of failed runs; and the counts per state."""
  plan = spec_lib.load_plan(root)
  states = runner.job_states(runner.jobs_of(plan), plan.sweep.get('metric'))
  counts: Dict[str, int] = {}
  for s in states:
    counts[s.state] = counts.get(s.state, 0) + 1
  width = max([len(s.run.name) for s in states] + [3])
  lines = [f'sweep {plan.name!r} at {plan.root}: {len(states)} runs']
  lines.append(f'{"run":<{width}}  {"state":<11}  attempts  detail')
  for s in states:
    lines.append(f'{s.run.name:<{width}}  {s.state:<11}  {s.attempts:>8}  {s.detail}')
  for s in states:
    if s.state == 'failed':
      lines.append('')
      lines.append(f'--- {s.run.name} failed ({s.detail}); log {s.job.log_path}, last lines:')
      lines += ['    ' + l for l in s.tail[-runner.TAIL_LINES :]]
  lines.append('')
  lines.append(', '.join(f'{k}: {v}' for k, v in sorted(counts.items())))
  return '\n'.join(lines), counts


def collect_roots(
    roots: Sequence[str],
    output_dir: Optional[str] = None,
    **kwargs,
) -> Dict[str, str]:
  """Collects one or several sweep roots into tables and a figure (see `collect.write`)."""
  plans = [spec_lib.load_plan(r) for r in roots]
  states = {}
  for plan in plans:
    for s in runner.job_states(
        runner.jobs_of(plan), kwargs.get('metric') or plan.sweep.get('metric')
    ):
      states[s.run.run_dir] = s.state
  output_dir = output_dir or fs.join(plans[0].root, 'collected')
  return collect.write(plans, output_dir, states=states, **kwargs)
