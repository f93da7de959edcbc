"""The Ray executor: each job of a sweep is one Ray task with the spec's resource request.

`ray.init(address=...)` joins an existing cluster (`address='auto'`, or `ray://host:10001`);
without an address a local Ray instance is started for the sweep (and shut down after it). Every
task executes the same job function as the local executor (`runner.execute`: the lock, the log, the
status record, the run's own process), on whatever node Ray places it, so the sweep root must be on
a file system all nodes see, and the project must be importable there (installed, or the same
checkout on `PYTHONPATH`). A task asks for `Sweep.resources` (default one CPU); with `num_gpus`
Ray sets `CUDA_VISIBLE_DEVICES` for the task and its run inherits it; a TPU host is a custom
resource (`resources = {'resources': {'TPU': 4}}`).

Ray is an optional dependency: `pip install -e ".[ray]"`.
"""

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from prompt_tuning.sweeps import runner


def _task(job_json: Mapping[str, Any], metric, env_overrides, cwd) -> Dict[str, Any]:
  import dataclasses  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  env = dict(os.environ)
  env.update(env_overrides)
  result = runner.execute(runner.Job.from_json(job_json), metric, env, cwd)
  return dataclasses.asdict(result)


def run_ray(
    jobs: Sequence[runner.Job],
    metric: Optional[str],
    env_overrides: Mapping[str, str],
    *,
    cwd: Optional[str] = None,
    address: Optional[str] = None,
    num_cpus: Optional[int] = None,
    resources: Optional[Mapping[str, Any]] = None,
    out: Callable[[str], None] = print,
) -> List[runner.JobResult]:
  """Runs the jobs that are not done as Ray tasks; returns their results.

  Args:
    jobs: the sweep's jobs.
    metric: the sweep's metric (a run is done when it logged it at its last step).
    env_overrides: environment variables set for every run on top of the worker's environment.
    cwd: working directory of the runs (relative gin search paths).
    address: a Ray cluster address; None starts a local instance.
    num_cpus: CPUs of the local instance (only when `address` is None).
    resources: one task's request: `num_cpus`, `num_gpus`, `memory`, `resources`, ...
  """
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise RuntimeError(
        'The ray executor needs Ray: pip install -e ".[ray]" (or pip install "ray>=2.40,<3").'
    ) from None
  started_here = not ray.is_initialized()
  if started_here:
    kwargs: Dict[str, Any] = {'include_dashboard': False, 'log_to_driver': False}
    if address:
      kwargs['address'] = address
    else:
      # A local instance for this sweep: the tasks pass only small records, so a small object
      # store keeps Ray's shared memory out of the runs' way.
      kwargs['object_store_memory'] = 256 * 1024 * 1024
      if num_cpus:
        kwargs['num_cpus'] = int(num_cpus)
    ray.init(**kwargs)
  try:
    options = {'num_cpus': 1, 'max_retries': 0}
    options.update(dict(resources or {}))
    task = ray.remote(_task).options(**options)
    total = sum(len(j.runs) for j in jobs)
    todo = [j for j in jobs if not all(runner.run_done(r, metric)[0] for r in j.runs)]
    slots = int(ray.cluster_resources().get('CPU', 1) // max(options.get('num_cpus') or 1, 1))
    progress = runner.Progress(total, total - sum(len(j.runs) for j in todo), max(slots, 1), out)
    progress.report(f'[sweep] {len(todo)} of {len(jobs)} jobs to run on Ray ({total} runs in all)')
    pending = {}
    for job in todo:
      ref = task.remote(job.to_json(), metric, dict(env_overrides), cwd)
      pending[ref] = job
    progress.running = sum(len(j.runs) for j in todo)
    results: List[runner.JobResult] = []
    while pending:
      ready, _ = ray.wait(list(pending), num_returns=1, timeout=60)
      if not ready:
        progress.report(force=True)
        continue
      for ref in ready:
        job = pending.pop(ref)
        progress.running -= len(job.runs)
        try:
          result = runner.JobResult(**ray.get(ref))
        except Exception as e:  # pylint: disable=broad-except
          result = runner.JobResult(job.name, 'failed', reason=f'Ray task failed: {e}')
        results.append(result)
        progress.finished(result)
        event = f'[sweep] {result.outcome}: {result.name}'
        if result.outcome == 'failed':
          event += f' ({result.reason})'
        progress.report(event)
    progress.report('[sweep] finished this pass')
    return results
  finally:
    if started_here:
      ray.shutdown()
