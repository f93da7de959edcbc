"""`python -m prompt_tuning.sweep run|status|collect`: declarative gin sweeps.

    python -m prompt_tuning.sweep run SPEC --root DIR [--gin.MACRO=VALUE ...]
        [--executor local|ray] [--parallel N] [--devices 0,1,2,3] [--ray_address ADDR]
        [--print_commands [FILE]] [--skip_failed] [--only RUN ...]
    python -m prompt_tuning.sweep status --root DIR
    python -m prompt_tuning.sweep collect --root DIR [--root DIR2 ...] [--output DIR]
        [--metric TASK/NAME] [--metric_step final|best] [--x AXIS] [--lines A,B]
        [--where AXIS=LABEL[,LABEL]] [--name results]

`run` validates every run's gin configuration before anything starts (see
`prompt_tuning/sweeps/check.py`), saves the plan as `DIR/sweep.json`, then runs what is not finished:
rerunning the same command skips finished runs and resumes the others. `--print_commands` writes
one shell line per run (or vectorized group) instead, for Slurm arrays or pod launchers; the lines
produce the same run directories. `--gin.NAME=VALUE` binds the spec's macros (its checkpoint
paths, data directories). Exit codes: 0 all runs done, 1 some failed or unfinished, 2 invalid spec.
"""

import argparse
import os
import sys
from typing import List, Optional, Sequence


def _parse(argv: Sequence[str]):
  parser = argparse.ArgumentParser(
      prog='python -m prompt_tuning.sweep',
      description='Declarative gin sweeps: run, status, collect.',
  )
  sub = parser.add_subparsers(dest='command', required=True)
  p_run = sub.add_parser('run', help='validate, then run what is not finished')
  p_run.add_argument('spec', help='the sweep spec (a gin file; configs/sweeps/...)')
  p_run.add_argument('--root', required=True, help='the sweep root (run directories go here)')
  p_run.add_argument('--executor', choices=('local', 'ray'), default='local')
  p_run.add_argument('--parallel', type=int, default=1, help='local: runs at once')
  p_run.add_argument('--devices', default=None, help='local: one run per accelerator, e.g. 0,1,2,3')
  p_run.add_argument('--ray_address', default=None, help="ray: cluster address ('auto', ...)")
  p_run.add_argument('--ray_num_cpus', type=int, default=None, help='ray: CPUs of a local Ray')
  p_run.add_argument(
      '--print_commands',
      nargs='?',
      const='-',
      default=None,
      metavar='FILE',
      help='write one shell command per job (to FILE, or stdout) instead of running',
  )
  p_run.add_argument('--skip_failed', action='store_true', help='do not retry failed runs')
  p_run.add_argument('--only', nargs='+', default=(), help='run only these runs')
  p_run.add_argument('--no_check', action='store_true', help='skip the gin validation')
  p_run.add_argument('--gin_search_paths', default='', help='extra paths for the spec file')
  p_status = sub.add_parser('status', help='the state of every run')
  p_status.add_argument('--root', required=True)
  p_collect = sub.add_parser('collect', help='tables and figures of one or several sweeps')
  p_collect.add_argument('--root', action='append', required=True)
  p_collect.add_argument('--output', default=None, help='default ROOT/collected')
  p_collect.add_argument('--metric', default=None)
  p_collect.add_argument('--metric_step', choices=('final', 'best'), default=None)
  p_collect.add_argument('--x', default=None, help='the figure x axis')
  p_collect.add_argument('--lines', default=None, help='comma-separated axes of the lines')
  p_collect.add_argument('--where', action='append', default=[], help='AXIS=LABEL[,LABEL]')
  p_collect.add_argument('--log_x', action='store_true', default=None)
  p_collect.add_argument('--title', default=None)
  p_collect.add_argument('--name', default='results', help='output file names')
  args, rest = parser.parse_known_args(list(argv))
  gin_bindings, unknown = [], []
  for a in rest:
    if a.startswith('--gin.') and '=' in a:
      name, value = a[len('--gin.') :].split('=', 1)
      gin_bindings.append(f'{name} = {value}')
    else:
      unknown.append(a)
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  if gin_bindings and args.command != 'run':
    parser.error('--gin.NAME=VALUE bindings go with `run`')
  return args, gin_bindings


def main(argv: Optional[Sequence[str]] = None) -> int:
  from prompt_tuning.sweeps import driver  # pylint: disable=g-import-not-at-top

  args, gin_bindings = _parse(sys.argv[1:] if argv is None else argv)
  try:
    if args.command == 'run':
      return _run(args, gin_bindings)
    if args.command == 'status':
      text, counts = driver.status_text(args.root)
      print(text)
      return 0 if set(counts) <= {'done'} else 1
    where = {}
    for w in args.where:
      axis, _, labels = w.partition('=')
      where[axis] = labels.split(',')
    paths = driver.collect_roots(
        args.root,
        args.output,
        metric=args.metric,
        metric_step=args.metric_step,
        x_axis=args.x,
        line_axes=args.lines.split(',') if args.lines else None,
        where=where or None,
        log_x=args.log_x,
        title=args.title,
        name=args.name,
    )
    for kind, path in paths.items():
      print(f'{kind}: {path}')
    with open(paths['md']) as f:
      print(f.read())
    return 0
  except driver.SpecError as e:
    print(f'\nERROR: {e}', file=sys.stderr)
    return 2
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f'\nERROR: {type(e).__name__}: {e}', file=sys.stderr)
    return 1


def _run(args, gin_bindings: List[str]) -> int:
  from prompt_tuning.sweeps import driver  # pylint: disable=g-import-not-at-top

  search = [p for p in args.gin_search_paths.split(',') if p]
  plan = driver.plan_from_spec(args.spec, args.root, gin_bindings, search, args.only)
  env = dict(os.environ)
  overrides = driver.run_env_overrides(plan.root)
  cwd = os.getcwd()
  driver.prepare(plan, {**env, **overrides}, cwd=cwd, check=not args.no_check)
  if args.print_commands is not None:
    lines = driver.shell_commands(plan, overrides, cwd)
    text = '\n'.join(lines) + '\n'
    if args.print_commands == '-':
      sys.stdout.write(text)
    else:
      with open(args.print_commands, 'w') as f:
        f.write(text)
      print(f'[sweep] {len(lines)} commands written to {args.print_commands}', file=sys.stderr)
    return 0
  devices = [d for d in args.devices.split(',') if d] if args.devices else None
  results = driver.run(
      plan,
      env,
      overrides,
      executor=args.executor,
      cwd=cwd,
      parallel=args.parallel,
      devices=devices,
      ray_address=args.ray_address,
      ray_num_cpus=args.ray_num_cpus,
      skip_failed=args.skip_failed,
  )
  text, counts = driver.status_text(plan.root)
  print(text)
  failed = [r for r in results if r.outcome == 'failed']
  if failed or not set(counts) <= {'done'}:
    print(
        f'\n[sweep] not finished: {counts}. Fix the failures shown above and rerun the same '
        'command (finished runs are skipped, the others resume).'
    )
    return 1
  print(
      f'\n[sweep] all {sum(counts.values())} runs done. Collect them with: '
      f'python -m prompt_tuning.sweep collect --root {plan.root}'
  )
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # first: it may restart the process
  launch.fast_shutdown()
  sys.exit(main())
