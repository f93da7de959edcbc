"""Validates every run's gin configuration before a sweep starts anything.

Each run's gin files and bindings are parsed exactly as its entry point would parse them, with
unknown names as errors (`skip_unknown=False`), but nothing is called: a misspelled configurable,
parameter or gin file, or a value gin cannot parse, is reported with the run's name. A macro that
the sweep binds but that no gin file of the run uses (a misspelled `PROMPT_LENGHT` would otherwise
be silently ignored) is an error too.

`python -m prompt_tuning.sweeps.check ROOT_OR_PLAN.json` prints the problems as JSON (exit code 3
when there are some); the sweep command runs it in a subprocess, so the sweep's own process needs
neither TensorFlow nor the runs' task modules.
"""

import contextlib
import json
import re
import sys
import types
from typing import Dict, Iterator, List, Optional, Sequence, Set

from prompt_tuning.sweeps import spec as spec_lib

_ENTRY_FUNCTIONS = {
    'prompt_tuning.train': ('prompt_tuning.runtime.train', 'train'),
    'prompt_tuning.eval': ('prompt_tuning.runtime.eval', 'evaluate'),
}


def train(**kwargs):
  """Stands in for `train_script.train` while a run's gin configuration is read: it has the
  signature of `prompt_tuning.runtime.train.train` (so gin checks parameter names against it) and
  returns the arguments gin would pass (the vectorized job reads its runs' settings this way)."""
  return kwargs


@contextlib.contextmanager
def entry_main(entry: str) -> Iterator[None]:
  """`import __main__ as train_script` in gin files finds the entry point's function, as when the
  entry module runs (`python -m prompt_tuning.train` has `train` in its `__main__`)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import inspect  # pylint: disable=g-import-not-at-top

  module_name, fn_name = _ENTRY_FUNCTIONS[entry]
  stand_in = _STAND_INS.get(entry)
  if stand_in is None:
    stand_in = types.ModuleType('__main__')
    real = getattr(importlib.import_module(module_name), fn_name)
    if fn_name == 'train':
      train.__signature__ = inspect.signature(real)
      real = train
    setattr(stand_in, fn_name, real)
    _STAND_INS[entry] = stand_in
  saved = sys.modules.get('__main__')
  sys.modules['__main__'] = stand_in
  try:
    yield
  finally:
    if saved is not None:
      sys.modules['__main__'] = saved


_STAND_INS: Dict[str, types.ModuleType] = {}


def _search_paths(flags: Sequence[str]) -> List[str]:
  out = []
  for f in flags:
    m = re.match(r'^--gin_search_paths=(.*)$', f)
    if m:
      out += [p for p in m.group(1).split(',') if p]
  return out


def check_run(run: spec_lib.Run) -> List[str]:
  """The problems of one run's gin configuration (see `unused_macros` for the other check)."""
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top

  bindings = [f'{k} = {v}' for k, v in run.bindings]
  problems = []
  gin.clear_config()
  try:
    with entry_main(run.entry):
      gin_utils.parse_gin_flags(
          _search_paths(run.flags) or ['.'],
          run.gin_files,
          bindings,
          skip_unknown=False,
          finalize_config=False,
      )
      text = gin.config_str()
  except gin_utils.GinConfigError as e:
    # gin lists every search path it tried (they accumulate per process): keep the message short.
    msg = re.sub(r'Searched config paths: \[[^\]]*\]\.? ?', '', str(e).replace('\n', ' '))
    problems.append(msg)
    text = None
  except Exception as e:  # pylint: disable=broad-except
    problems.append(f'{type(e).__name__}: {e}'.splitlines()[0])
    text = None
  finally:
    gin.clear_config()
  _USED[run.name] = None if text is None else set(re.findall(r'%([A-Za-z_][\w.]*)', text))
  return problems


_USED: Dict[str, Optional[Set[str]]] = {}


def unused_macros(runs: Sequence[spec_lib.Run]) -> List[str]:
  """Macros bound by the sweep that no run's configuration uses (misspelled names).

  A macro used by some runs only is fine (e.g. CLASS_LABELS next to a random initialization).
  """
  bound: Dict[str, List[str]] = {}
  for run in runs:
    for key, _ in run.bindings:
      if '.' not in key and '/' not in key:
        bound.setdefault(key, []).append(run.name)
  out = []
  for key, names in bound.items():
    parsed = [_USED.get(n) for n in names]
    if parsed and all(u is not None and key not in u for u in parsed):
      out.append(
          f'run {names[0]}: the macro {key} is bound but no gin file of any run uses it '
          '(misspelled? the configuration refers to macros as %NAME).'
      )
  return out


def check_runs(runs: Sequence[spec_lib.Run]) -> List[str]:
  """Problems of all runs, one line per distinct problem (naming the first run that has it)."""
  by_problem: Dict[str, List[str]] = {}
  _USED.clear()
  for run in runs:
    for p in check_run(run):
      by_problem.setdefault(p, []).append(run.name)
  out = []
  for p, names in by_problem.items():
    more = f' (and {len(names) - 1} more runs)' if len(names) > 1 else ''
    out.append(f'run {names[0]}{more}: {p}')
  return out + unused_macros(runs)


def main(argv: Sequence[str]) -> int:
  if len(argv) != 2:
    print('usage: python -m prompt_tuning.sweeps.check PLAN.json', file=sys.stderr)
    return 2
  with open(argv[1]) as f:
    plan = spec_lib.Plan.from_json(json.load(f))
  problems = check_runs(plan.runs)
  print('SWEEP_CHECK ' + json.dumps(problems))
  return 3 if problems else 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()
  import logging  # pylint: disable=g-import-not-at-top

  logging.disable(logging.WARNING)
  sys.exit(main(sys.argv))
