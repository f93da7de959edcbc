"""The sweep spec: a gin file that binds `spec.Sweep`, expanded into named runs.

A spec is an ordinary gin file (so macros parameterise it, `include` shares settings, and
`--gin.NAME=VALUE` on the sweep's command line overrides them)::

    from __gin__ import dynamic_registration
    from prompt_tuning.sweeps import spec

    CHECKPOINT = %gin.REQUIRED
    spec.Sweep:
      name = 'prompt_length'
      gin_files = ['models/t5_1_1_prompt.gin', '{init}', 'runs/prompt_finetune.gin']
      bindings = {'INITIAL_CHECKPOINT_PATH': %CHECKPOINT, 'TRAIN_STEPS': 1_130_000}
      axes = {
          'length': {'PROMPT_LENGTH': [1, 5, 20, 100, 150]},
          'init': {'label': ['random', 'vocab'],
                   'gin_file': ['prompts/random_uniform.gin', 'prompts/from_sampled_vocab.gin']},
      }
      seeds = [0, 1, 2]
      metric = 'super_glue_boolq_v102/accuracy'

Axes combine by product, in the order written; inside one axis the lists are zipped (one value per
position), so an axis can set several bindings together (a model's gin file and its checkpoint).
Besides `--gin.NAME` bindings an axis may have the reserved keys `label` (the value's name in run
names, tables and figures), `gin_file` (a gin file per value, placed at the `'{axis}'` entry of
`gin_files`, else appended) and `plot_x` (the value's x position in figures, e.g. a parameter
count). `seeds` is one more axis, named `seed`, bound to `seed_binding` (`RANDOM_SEED`).

Values are written as gin literals (`repr`); a string that starts with `@` or `%` is a gin reference
and is written as it is (`'@prompts.uniform()'`, `'%OTHER_MACRO'`). In strings, `{root}` (the sweep
root), `{run_dir}` (the run's directory), `{name}` (the run's name) and `{AXIS}` (the label of the
run's value on that axis) are replaced.

A run is named `axis=label,...,seed=S` and its directory `ROOT/<name>` is its `MODEL_DIR` (or
`EVAL_OUTPUT_DIR` for `entry = 'prompt_tuning.eval'`). The expanded plan is saved as
`ROOT/sweep.json`; `collect` and `status` read only that file and the run directories.
"""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from prompt_tuning import fs

SEED_AXIS = 'seed'
RESERVED_KEYS = ('label', 'gin_file', 'plot_x')
PLAN_FILE = 'sweep.json'
VECTORIZED_DIR = 'vectorized'
# The macro each entry point writes its outputs to.
OUTPUT_MACROS = {
    'prompt_tuning.train': 'MODEL_DIR',
    'prompt_tuning.eval': 'EVAL_OUTPUT_DIR',
}
# Axes whose values may be trained together as one vectorized job (`Sweep.vectorize`) change only
# the prompt's initialization, the seed or the learning rate; the job checks this when it starts.
_GIN_NAME = re.compile(r'^[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*$')
_LABEL_CHARS = re.compile(r'[^A-Za-z0-9._+-]')
_PLACEHOLDER = re.compile(r'\{([A-Za-z_]\w*)\}')


class SpecError(ValueError):
  """The sweep spec is invalid (raised before any run starts)."""


@dataclasses.dataclass
class Sweep:
  """A sweep: base gin files and bindings, named axes, seeds, and what to report.

  Attributes:
    name: the sweep's name (tables, figures).
    gin_files: gin files of every run, in order; an entry `'{AXIS}'` is replaced by that axis's
      `gin_file` of the run (axes with `gin_file` and no such entry append theirs at the end).
    bindings: `{gin name: value}` for every run (`--gin.NAME=VALUE`).
    axes: `{axis: {gin name or reserved key: [values]}}`; product over axes, zip within one.
    seeds: the seed axis (None: no seed axis and no seed binding).
    seed_binding: the gin name the seed is bound to.
    entry: the module each run executes (`python -m ENTRY`).
    flags: extra command-line flags of every run (e.g. `--gin_search_paths=...`).
    tfds_data_dir: passed as `--tfds_data_dir` when set.
    metric: the reported metric, `TASK/METRIC` of the runs' inference evaluation (`METRIC` alone
      when the runs evaluate one task); `{AXIS}` is replaced by the run's label on that axis.
    metric_step: `'final'` (the value at the last evaluated step) or `'best'`.
    metric_mode: `'max'` or `'min'`: what `'best'` means.
    figure_x: the axis on the figures' x axis (None: the first axis).
    figure_lines: axes whose combinations are the figure's lines (None: every other axis).
    figure_log_x: a logarithmic x axis (model sizes, prompt lengths).
    vectorize: axes (`seed` included) whose runs are trained together, as one job per
      combination of the other axes, when they differ only in the prompt's initialization, the
      seed or the learning rate.
    resources: Ray resources of one run (`num_cpus`, `num_gpus`, `resources={'TPU': 4}`, ...).
  """

  name: str
  gin_files: Sequence[str] = ()
  bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  axes: Mapping[str, Mapping[str, Sequence[Any]]] = dataclasses.field(default_factory=dict)
  seeds: Optional[Sequence[int]] = (0,)
  seed_binding: str = 'RANDOM_SEED'
  entry: str = 'prompt_tuning.train'
  flags: Sequence[str] = ()
  tfds_data_dir: Optional[str] = None
  metric: Optional[str] = None
  metric_step: str = 'final'
  metric_mode: str = 'max'
  figure_x: Optional[str] = None
  figure_lines: Optional[Sequence[str]] = None
  figure_log_x: bool = False
  vectorize: Sequence[str] = ()
  resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------- gin literals


def to_gin(value: Any, where: str = 'value') -> str:
  """`value` as gin text; strings starting with `@` or `%` are references, kept as they are."""
  if isinstance(value, str):
    if value[:1] in ('@', '%'):
      return value
    return repr(value)
  if value is None or isinstance(value, bool):
    return repr(value)
  if isinstance(value, int):
    return repr(int(value))
  if isinstance(value, float):
    if not math.isfinite(value):
      raise SpecError(f'{where}: {value!r} cannot be written as a gin literal (not finite).')
    return repr(float(value))
  if isinstance(value, (list, tuple)):
    items = [to_gin(v, where) for v in value]
    if isinstance(value, tuple):
      return '(' + ', '.join(items) + (',)' if len(items) == 1 else ')')
    return '[' + ', '.join(items) + ']'
  if isinstance(value, Mapping):
    return (
        '{' + ', '.join(f'{to_gin(k, where)}: {to_gin(v, where)}' for k, v in value.items()) + '}'
    )
  raise SpecError(
      f'{where}: {value!r} (a {type(value).__name__}) cannot be written as a gin literal; use a '
      "number, string, bool, None, list, tuple or dict, or a reference string ('@name()', '%MACRO')."
  )


def _substitute(value: Any, names: Mapping[str, str]) -> Any:
  """Replaces `{root}`, `{run_dir}`, `{name}` and `{AXIS}` in strings (nested in containers too)."""
  if isinstance(value, str):
    return _PLACEHOLDER.sub(lambda m: names.get(m.group(1), m.group(0)), value)
  if isinstance(value, list):
    return [_substitute(v, names) for v in value]
  if isinstance(value, tuple):
    return tuple(_substitute(v, names) for v in value)
  if isinstance(value, Mapping):
    return {k: _substitute(v, names) for k, v in value.items()}
  return value


def run_metric(metric: Optional[str], run: 'Run') -> Optional[str]:
  """The sweep's metric for one run: `{AXIS}` replaced by the run's label on that axis.

  E.g. `'taskless_glue_{target}_v002/accuracy'` when the evaluated task depends on an axis.
  """
  if not metric:
    return metric
  return _substitute(metric, dict(run.settings))


def label_of(value: Any) -> str:
  """A short, file-name-safe name for an axis value."""
  if isinstance(value, str):
    text = value
    if text.endswith('.gin'):
      text = os.path.splitext(os.path.basename(text))[0]
    elif text[:1] in ('@', '%'):
      text = text.lstrip('@%').rstrip('()').split('/')[-1]
  elif isinstance(value, (bool, int, float)) or value is None:
    text = repr(value)
  else:
    raise SpecError(
        f'An axis value {value!r} has no obvious name: give the axis a `label` list '
        "(e.g. 'label': ['small', 'base'])."
    )
  return _LABEL_CHARS.sub('_', text)[:60]


# ------------------------------------------------------------------------------------- runs and plan


@dataclasses.dataclass
class Run:
  """One run of a sweep: its settings and the command that executes it."""

  name: str
  settings: Dict[str, str]  # axis -> label, in axis order (the seed axis last)
  plot_x: Dict[str, float]  # axis -> x position of the value in figures
  entry: str
  gin_files: List[str]
  bindings: List[Tuple[str, str]]  # (gin name, gin text)
  flags: List[str]
  run_dir: str
  group: Optional[str] = None  # the vectorized job training this run, if any

  def argv(self, python: Optional[str] = None) -> List[str]:
    """`python -m ENTRY --gin_file=... --gin.NAME=VALUE ... FLAGS`."""
    args = [python or sys.executable, '-m', self.entry]
    args += [f'--gin_file={g}' for g in self.gin_files]
    args += [f'--gin.{k}={v}' for k, v in self.bindings]
    return args + list(self.flags)

  @property
  def log_name(self) -> str:
    return self.entry.rsplit('.', 1)[-1] + '.log'

  def fingerprint(self) -> str:
    """Changes whenever what the run computes changes (not when its root moves)."""
    output = OUTPUT_MACROS.get(self.entry)
    bindings = [list(b) for b in self.bindings if b[0] != output]
    text = json.dumps([self.entry, self.gin_files, bindings, self.flags])
    return hashlib.sha1(text.encode()).hexdigest()[:16]

  def to_json(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d['bindings'] = [list(b) for b in self.bindings]
    d['fingerprint'] = self.fingerprint()
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'Run':
    d = {k: v for k, v in d.items() if k != 'fingerprint'}
    d['bindings'] = [tuple(b) for b in d['bindings']]
    return cls(**d)


@dataclasses.dataclass
class Plan:
  """A sweep expanded into runs under a root directory (saved as `ROOT/sweep.json`)."""

  sweep: Dict[str, Any]  # the spec's reporting fields (name, metric, axes, figure, ...)
  root: str
  runs: List[Run]

  @property
  def name(self) -> str:
    return self.sweep['name']

  @property
  def axes(self) -> List[str]:
    """Axis names in order (the seed axis last, when there is one)."""
    return list(self.sweep['axes'])

  def run(self, name: str) -> Run:
    for r in self.runs:
      if r.name == name:
        return r
    raise KeyError(f'No run named {name!r} in the sweep at {self.root}.')

  def groups(self) -> Dict[str, List[Run]]:
    """Vectorized jobs: `{group: member runs}`."""
    out: Dict[str, List[Run]] = {}
    for r in self.runs:
      if r.group:
        out.setdefault(r.group, []).append(r)
    return out

  def group_dir(self, group: str) -> str:
    return fs.join(self.root, VECTORIZED_DIR, group)

  def to_json(self) -> Dict[str, Any]:
    return {
        'sweep': self.sweep,
        'root': self.root,
        'runs': [r.to_json() for r in self.runs],
    }

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> 'Plan':
    return cls(sweep=dict(d['sweep']), root=d['root'], runs=[Run.from_json(r) for r in d['runs']])

  def save(self) -> None:
    fs.makedirs(self.root)
    fs.write_text(fs.join(self.root, PLAN_FILE), json.dumps(self.to_json(), indent=1))


def load_plan(root: str) -> Plan:
  """The plan a `run` or `--print_commands` saved under `root`."""
  path = fs.join(root, PLAN_FILE)
  if not fs.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: {root} is not a sweep root. Start the sweep with '
        '`python -m prompt_tuning.sweep run SPEC --root ROOT` (or --print_commands) first.'
    )
  plan = Plan.from_json(json.loads(fs.read_text(path)))
  # A root moved or copied elsewhere keeps working: run directories are under it.
  here = fs.abspath(root)
  if plan.root != here:
    old = plan.root
    plan.root = here
    for r in plan.runs:
      if r.run_dir.startswith(old):
        r.run_dir = here + r.run_dir[len(old) :]
  return plan


@dataclasses.dataclass
class _AxisValue:
  label: str
  plot_x: Optional[float]
  gin_files: List[str]
  bindings: Dict[str, Any]


def _axis_values(axis: str, spec: Mapping[str, Sequence[Any]]) -> List[_AxisValue]:
  if not isinstance(spec, Mapping) or not spec:
    raise SpecError(
        f'Axis {axis!r} is empty: give it at least one gin name and its values, e.g. '
        f"{{'PROMPT_LENGTH': [1, 5, 20]}}."
    )
  lengths = {}
  for key, values in spec.items():
    if not isinstance(values, (list, tuple)):
      raise SpecError(
          f'Axis {axis!r}: the values of {key!r} must be a list, got {values!r} '
          f'(write [{values!r}] for a single value).'
      )
    if not values:
      raise SpecError(f'Axis {axis!r}: {key!r} has no values (an empty axis gives no runs).')
    if key not in RESERVED_KEYS and not _GIN_NAME.match(str(key)):
      raise SpecError(
          f'Axis {axis!r}: {key!r} is not a gin name (a macro such as PROMPT_LENGTH or a '
          'parameter such as utils.SaveCheckpointConfig.period) nor one of '
          f'{list(RESERVED_KEYS)}.'
      )
    lengths[key] = len(values)
  if len(set(lengths.values())) != 1:
    raise SpecError(
        f'Axis {axis!r}: the lists of one axis are zipped and must have the same length, got '
        f'{lengths}. Put independent settings on separate axes (they combine by product).'
    )
  n = next(iter(lengths.values()))
  bound = [k for k in spec if k not in ('label', 'plot_x')]
  if not bound and 'label' not in spec:
    raise SpecError(
        f'Axis {axis!r} binds nothing: add a gin name, a gin_file list, or labels used as '
        f"'{{{axis}}}' in the spec's gin files or bindings."
    )
  out = []
  for i in range(n):
    if 'label' in spec:
      label = _LABEL_CHARS.sub('_', str(spec['label'][i]))
    else:
      label = label_of(spec[bound[0]][i])
    gin_files = []
    if 'gin_file' in spec:
      g = spec['gin_file'][i]
      gin_files = list(g) if isinstance(g, (list, tuple)) else [g]
    plot_x = None
    if 'plot_x' in spec:
      plot_x = float(spec['plot_x'][i])
    else:
      try:
        plot_x = float(label)
      except ValueError:
        plot_x = None
    bindings = {k: spec[k][i] for k in spec if k not in RESERVED_KEYS}
    out.append(_AxisValue(label, plot_x, gin_files, bindings))
  return out


def _check_fields(sweep: Sweep) -> None:
  if not isinstance(sweep.name, str) or not sweep.name:
    raise SpecError('The sweep has no name: bind spec.Sweep.name.')
  if sweep.metric_step not in ('final', 'best'):
    raise SpecError(f"metric_step must be 'final' or 'best', got {sweep.metric_step!r}.")
  if sweep.metric_mode not in ('max', 'min'):
    raise SpecError(f"metric_mode must be 'max' or 'min', got {sweep.metric_mode!r}.")
  if sweep.seeds is not None:
    if not list(sweep.seeds):
      raise SpecError('seeds is empty: give at least one seed (or seeds = None for no seed axis).')
    if any(not isinstance(s, int) or isinstance(s, bool) for s in sweep.seeds):
      raise SpecError(f'seeds must be integers, got {list(sweep.seeds)!r}.')
  if not isinstance(sweep.axes, Mapping):
    raise SpecError(f'axes must be a dict {{axis: {{gin name: [values]}}}}, got {sweep.axes!r}.')
  if SEED_AXIS in sweep.axes:
    raise SpecError(f'{SEED_AXIS!r} is the seed axis; give its values with `seeds`.')
  for axis in sweep.axes:
    if not re.match(r'^[A-Za-z_][\w-]*$', str(axis)):
      raise SpecError(f'Axis name {axis!r}: use letters, digits, _ and -.')
  names = list(sweep.axes) + ([SEED_AXIS] if sweep.seeds is not None else [])
  for field in ('figure_x',):
    value = getattr(sweep, field)
    if value is not None and value not in names:
      raise SpecError(f'{field} = {value!r} is not an axis (axes: {names}).')
  for field in ('figure_lines', 'vectorize'):
    for value in getattr(sweep, field) or ():
      if value not in names:
        raise SpecError(f'{field} names {value!r}, which is not an axis (axes: {names}).')
  if sweep.entry not in OUTPUT_MACROS:
    raise SpecError(f'entry must be one of {sorted(OUTPUT_MACROS)}, got {sweep.entry!r}.')
  if sweep.vectorize and sweep.entry != 'prompt_tuning.train':
    raise SpecError('vectorize applies to training runs (entry prompt_tuning.train) only.')
  for key in sweep.bindings:
    if not _GIN_NAME.match(str(key)):
      raise SpecError(f'bindings: {key!r} is not a gin name.')


def expand(sweep: Sweep, root: str) -> Plan:
  """Expands `sweep` into named runs under `root` (no file is written).

  Raises:
    SpecError: an empty axis, unequal zipped lists, a value gin cannot represent, two runs with
      the same name, or a field that names no axis.
  """
  _check_fields(sweep)
  root = fs.abspath(root)
  axes: List[Tuple[str, List[_AxisValue]]] = [
      (axis, _axis_values(axis, spec)) for axis, spec in sweep.axes.items()
  ]
  if sweep.seeds is not None:
    axes.append(
        (
            SEED_AXIS,
            [_AxisValue(str(s), float(s), [], {sweep.seed_binding: s}) for s in sweep.seeds],
        )
    )
  output_macro = OUTPUT_MACROS[sweep.entry]
  flags = list(sweep.flags) + (
      [f'--tfds_data_dir={sweep.tfds_data_dir}'] if sweep.tfds_data_dir else []
  )
  vectorized = set(sweep.vectorize or ())
  runs: List[Run] = []
  for combo in itertools.product(*[values for _, values in axes]):
    settings = {axis: v.label for (axis, _), v in zip(axes, combo)}
    name = ','.join(f'{a}={l}' for a, l in settings.items()) or sweep.name
    run_dir = fs.join(root, name)
    names = {'root': root, 'run_dir': run_dir, 'name': name, **settings}
    gin_files: List[str] = []
    placed = set()
    for g in sweep.gin_files:
      m = re.fullmatch(r'\{([A-Za-z_][\w-]*)\}', g)
      if m and m.group(1) in settings:
        axis = m.group(1)
        placed.add(axis)
        gin_files += [f for (a, _), v in zip(axes, combo) if a == axis for f in v.gin_files]
      else:
        gin_files.append(_substitute(g, names))
    for (axis, _), v in zip(axes, combo):
      if axis not in placed:
        gin_files += v.gin_files
    values: Dict[str, Any] = dict(sweep.bindings)
    for _, v in zip(axes, combo):
      values.update(v.bindings)
    values[output_macro] = run_dir
    bindings = []
    for key, value in values.items():
      where = f'run {name}: {key}'
      bindings.append((key, to_gin(_substitute(value, names), where)))
    plot_x = {axis: v.plot_x for (axis, _), v in zip(axes, combo) if v.plot_x is not None}
    group = None
    if vectorized:
      group = ','.join(f'{a}={l}' for a, l in settings.items() if a not in vectorized) or 'all'
    runs.append(
        Run(
            name=name,
            settings=settings,
            plot_x=plot_x,
            entry=sweep.entry,
            gin_files=gin_files,
            bindings=bindings,
            flags=list(flags),
            run_dir=run_dir,
            group=group,
        )
    )
  seen: Dict[str, int] = {}
  for r in runs:
    seen[r.name] = seen.get(r.name, 0) + 1
  dups = sorted(n for n, c in seen.items() if c > 1)
  if dups:
    raise SpecError(
        f'{len(dups)} run name(s) occur more than once: {dups[:5]}. Two values of one axis have '
        'the same label: give the axis distinct `label`s.'
    )
  same: Dict[str, str] = {}
  for r in runs:
    key = json.dumps([r.entry, r.gin_files, [b for b in r.bindings if b[0] != output_macro]])
    if key in same:
      raise SpecError(
          f'Runs {same[key]} and {r.name} would compute the same thing (the same gin files and '
          'bindings): an axis changes nothing. Bind something per value, or use its label as '
          "'{AXIS}' in gin_files or bindings."
      )
    same[key] = r.name
  report = {
      'name': sweep.name,
      'axes': [axis for axis, _ in axes],
      'axis_labels': {axis: [v.label for v in values] for axis, values in axes},
      'metric': sweep.metric,
      'metric_step': sweep.metric_step,
      'metric_mode': sweep.metric_mode,
      'figure_x': sweep.figure_x or (axes[0][0] if axes else None),
      'figure_lines': list(sweep.figure_lines) if sweep.figure_lines is not None else None,
      'figure_log_x': bool(sweep.figure_log_x),
      'vectorize': list(sweep.vectorize or ()),
      'resources': dict(sweep.resources or {}),
      'entry': sweep.entry,
  }
  return Plan(sweep=report, root=root, runs=runs)


# ------------------------------------------------------------------------------------- loading


def load_sweep(path: str, bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> Sweep:
  """Parses a spec file (plus `NAME = VALUE` bindings for its macros) and returns its `Sweep`.

  The gin configuration is cleared before and after, so the caller's gin state is not used.

  Raises:
    SpecError: the file does not parse or binds no `spec.Sweep`.
  """
  import gin  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top

  gin.clear_config()
  try:
    try:
      gin_utils.parse_gin_flags(
          list(search_paths),
          [path],
          list(bindings),
          finalize_config=False,
      )
    except gin_utils.GinConfigError as e:
      raise SpecError(f'The sweep spec {path} does not parse: {e}') from None
    try:
      if 'Sweep.' not in gin.config_str():
        raise KeyError('Sweep')
      configurable = gin.get_configurable(Sweep)
    except (KeyError, ValueError):
      raise SpecError(
          f'The sweep spec {path} binds no spec.Sweep: it needs `from prompt_tuning.sweeps import '
          'spec` and `spec.Sweep.name = ...` (see configs/sweeps/).'
      ) from None
    try:
      sweep = configurable()
    except (TypeError, ValueError, RuntimeError) as e:
      msg = re.sub(r' \(<(?:function|class) [^>]*>\)', '', str(e).splitlines()[0])
      raise SpecError(f'The sweep spec {path} is incomplete: {msg}') from None
  finally:
    gin.clear_config()
  if _contains_required([getattr(sweep, f.name) for f in dataclasses.fields(sweep)]):
    given = {b.split('=', 1)[0].strip() for b in bindings}
    unset = [m for m in _required_macros(path) if m not in given]
    raise SpecError(
        f'The sweep spec {path} needs values for its macros {unset or "(see the spec)"}: pass '
        'them as --gin.NAME=VALUE, e.g. --gin.%s="\'/path/to/checkpoint\'".'
        % (unset or ['NAME'])[0]
    )
  return sweep


def _contains_required(value: Any) -> bool:
  import gin  # pylint: disable=g-import-not-at-top

  if value is gin.REQUIRED:
    return True
  if isinstance(value, Mapping):
    return any(_contains_required(v) for v in value.values())
  if isinstance(value, (list, tuple)):
    return any(_contains_required(v) for v in value)
  return False


def _required_macros(path: str) -> List[str]:
  """Macros that a spec file declares as `NAME = %gin.REQUIRED`."""
  try:
    text = fs.read_text(path)
  except OSError:
    return []
  return re.findall(r'^\s*([A-Za-z_]\w*)\s*=\s*%gin\.REQUIRED\b', text, re.M)
