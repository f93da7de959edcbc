"""Collects a sweep's runs into a CSV/JSON of every run, Markdown tables and paper-style figures.

Metrics come from the files the runs write themselves: seqio's JSON logger appends one line per
evaluation to `RUN_DIR/inference_eval/<task>-metrics.jsonl` (`{"step": 1130000, "accuracy": ...}`),
for training runs and for `prompt_tuning.eval` runs alike. The reported value of a run is its
spec's `metric` at the last evaluated step (`metric_step = 'final'`) or at its best step.

Per setting (every axis but the seed) the table gives the mean and the sample standard deviation
(`ddof=1`, as over a paper's few runs) of the runs that have a value, and how many they are; a
setting with a single run shows no deviation. The figure puts one axis on x (numbers where the
labels are numbers or the axis has `plot_x`, else the values in order) and draws one line with
error bars (the standard deviation) per combination of the other axes.
"""

import csv
import io
import json
import math
import re
import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from prompt_tuning import fs
from prompt_tuning.sweeps import spec as spec_lib

METRICS_DIR = 'inference_eval'
_METRICS_FILE = re.compile(r'^(.+)-metrics\.jsonl$')
MISSING = '-'


def read_metrics(run_dir: str) -> Dict[str, Dict[int, Dict[str, float]]]:
  """`{task: {step: {metric: value}}}` from a run's `inference_eval/*-metrics.jsonl` files.

  A step evaluated twice (a resumed run repeats its last evaluation) keeps the later line.
  """
  out: Dict[str, Dict[int, Dict[str, float]]] = {}
  directory = fs.join(run_dir, METRICS_DIR)
  for name in fs.listdir(directory, missing_ok=True):
    m = _METRICS_FILE.match(name)
    if not m:
      continue
    task = m.group(1)
    for line in fs.read_text(fs.join(directory, name)).splitlines():
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill; the evaluation is repeated on resume
      step = int(record.pop('step', 0))
      values = {}
      for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          values[k] = float(v)
        elif isinstance(v, dict) and isinstance(v.get('value'), (int, float)):
          values[k] = float(v['value'])
      out.setdefault(task, {}).setdefault(step, {}).update(values)
  return out


def resolve_metric(metrics: Mapping[str, Mapping[int, Mapping[str, float]]], metric: str):
  """`(task, name)` of `metric` (`TASK/NAME`, or `NAME` when one task has it); None if absent."""
  if '/' in metric:
    task, name = metric.split('/', 1)
    if task in metrics and any(name in v for v in metrics[task].values()):
      return task, name
    return None
  tasks = [t for t, steps in metrics.items() if any(metric in v for v in steps.values())]
  if len(tasks) > 1:
    raise ValueError(
        f'Metric {metric!r} is reported by several tasks ({sorted(tasks)}): name it as TASK/METRIC.'
    )
  return (tasks[0], metric) if tasks else None


def available_metrics(metrics: Mapping[str, Mapping[int, Mapping[str, float]]]) -> List[str]:
  names = set()
  for task, steps in metrics.items():
    for values in steps.values():
      names.update(f'{task}/{k}' for k in values)
  return sorted(names)


def metric_value(
    metrics: Mapping[str, Mapping[int, Mapping[str, float]]],
    metric: str,
    metric_step: str = 'final',
    mode: str = 'max',
) -> Optional[Tuple[int, float]]:
  """`(step, value)` of `metric`: at the last evaluated step, or the best one; None if absent."""
  found = resolve_metric(metrics, metric)
  if found is None:
    return None
  task, name = found
  points = sorted((s, v[name]) for s, v in metrics[task].items() if name in v)
  if metric_step == 'final':
    return points[-1]
  pick = max if mode == 'max' else min
  return pick(points, key=lambda p: p[1])


# ------------------------------------------------------------------------------------------ rows


def run_rows(
    plans: Sequence[spec_lib.Plan],
    metric: Optional[str] = None,
    metric_step: Optional[str] = None,
    states: Optional[Mapping[str, str]] = None,
) -> List[Dict[str, Any]]:
  """One row per run: sweep, run, each axis label, the seed, step, value, every final metric."""
  rows = []
  for plan in plans:
    m = metric or plan.sweep.get('metric')
    step_mode = metric_step or plan.sweep.get('metric_step', 'final')
    mode = plan.sweep.get('metric_mode', 'max')
    for run in plan.runs:
      metrics = read_metrics(run.run_dir)
      row: Dict[str, Any] = {'sweep': plan.name, 'run': run.name}
      row.update(run.settings)
      row['_plot_x'] = dict(run.plot_x)
      value = metric_value(metrics, spec_lib.run_metric(m, run), step_mode, mode) if m else None
      row['step'] = value[0] if value else None
      row['value'] = value[1] if value else None
      if states is not None:
        row['state'] = states.get(run.run_dir)
      for task, steps in sorted(metrics.items()):
        if steps:
          last = max(steps)
          for k, v in sorted(steps[last].items()):
            row[f'{task}/{k}'] = v
      rows.append(row)
  return rows


def _axes(plans: Sequence[spec_lib.Plan]) -> List[str]:
  out: List[str] = []
  for plan in plans:
    for a in plan.axes:
      if a not in out:
        out.append(a)
  return out


def _where(rows: List[Dict[str, Any]], where: Mapping[str, Sequence[str]]) -> List[Dict[str, Any]]:
  """Rows whose label on each named axis is one of the given labels (or that lack the axis)."""
  out = []
  for r in rows:
    if all(r.get(a, MISSING) in labels or a not in r for a, labels in where.items()):
      out.append(r)
  return out


def summarize(
    rows: Sequence[Mapping[str, Any]], axes: Sequence[str], by_sweep: bool = False
) -> List[Dict[str, Any]]:
  """Mean, sample standard deviation and count of `value` per setting (every axis but the seed)."""
  keys = (['sweep'] if by_sweep else []) + [a for a in axes if a != spec_lib.SEED_AXIS]
  groups: Dict[Tuple[str, ...], List[Mapping[str, Any]]] = {}
  for r in rows:
    groups.setdefault(tuple(str(r.get(k, MISSING)) for k in keys), []).append(r)
  out = []
  for key, members in groups.items():
    values = [float(r['value']) for r in members if r.get('value') is not None]
    entry: Dict[str, Any] = dict(zip(keys, key))
    entry['n'] = len(values)
    entry['runs'] = len(members)
    entry['mean'] = statistics.fmean(values) if values else None
    entry['std'] = statistics.stdev(values) if len(values) > 1 else None
    entry['values'] = values
    xs = {}
    for r in members:
      xs.update(r.get('_plot_x') or {})
    entry['_plot_x'] = xs
    out.append(entry)
  return out


def _fmt(mean: Optional[float], std: Optional[float]) -> str:
  if mean is None:
    return MISSING
  if std is None:
    return f'{mean:.2f}'
  return f'{mean:.2f} ± {std:.2f}'


def markdown_table(
    summary: Sequence[Mapping[str, Any]], axes: Sequence[str], metric: str, by_sweep: bool = False
) -> str:
  """One row per setting: its axis labels, `mean ± std` of `metric`, and `n` (runs with a value)."""
  keys = (['sweep'] if by_sweep else []) + [a for a in axes if a != spec_lib.SEED_AXIS]
  head = keys + [f'{metric} (mean ± std)', 'n']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for s in summary:
    cells = [str(s.get(k, MISSING)) for k in keys]
    cells += [_fmt(s['mean'], s['std']), f"{s['n']}/{s['runs']}"]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def pivot_table(
    summary: Sequence[Mapping[str, Any]],
    row_keys: Sequence[str],
    column_axis: str,
    column_labels: Sequence[str],
    metric: str,
) -> str:
  """The paper's layout: one row per combination of `row_keys`, one column per `column_axis` label."""
  rows: Dict[Tuple[str, ...], Dict[str, str]] = {}
  for s in summary:
    key = tuple(str(s.get(k, MISSING)) for k in row_keys)
    rows.setdefault(key, {})[str(s.get(column_axis, MISSING))] = _fmt(s['mean'], s['std'])
  labels = [l for l in column_labels if any(l in r for r in rows.values())]
  labels += sorted({l for r in rows.values() for l in r} - set(labels))
  head = list(row_keys) + [f'{column_axis}={l}' for l in labels]
  lines = [f'{metric}, mean ± std over seeds', '', '| ' + ' | '.join(head) + ' |']
  lines.append('|' + '---|' * len(head))
  for key, cells in rows.items():
    lines.append('| ' + ' | '.join(list(key) + [cells.get(l, MISSING) for l in labels]) + ' |')
  return '\n'.join(lines) + '\n'


def figure(
    summary: Sequence[Mapping[str, Any]],
    x_axis: str,
    line_keys: Sequence[str],
    x_labels: Sequence[str],
    path: str,
    *,
    log_x: bool = False,
    title: str = '',
    ylabel: str = '',
) -> None:
  """x = `x_axis`, one line per combination of `line_keys`, error bars = standard deviation."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  order = {l: i for i, l in enumerate(x_labels)}
  numeric = all(
      x_axis in (s.get('_plot_x') or {}) for s in summary if s.get(x_axis, MISSING) != MISSING
  )
  lines: Dict[Tuple[str, ...], List[Tuple[float, str, Optional[float], Optional[float]]]] = {}
  for s in summary:
    label = str(s.get(x_axis, MISSING))
    key = tuple(str(s.get(k, MISSING)) for k in line_keys)
    if label == MISSING:
      # A setting without this axis (e.g. model tuning next to a prompt-length sweep): a
      # horizontal reference line.
      lines.setdefault(key + ('(all)',), []).append((math.nan, label, s['mean'], s['std']))
      continue
    x = float(s['_plot_x'][x_axis]) if numeric else float(order.get(label, len(order)))
    lines.setdefault(key, []).append((x, label, s['mean'], s['std']))
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for key, points in lines.items():
    name = ', '.join(f'{k}={v}' for k, v in zip(line_keys, key) if v != MISSING) or 'all'
    if key[-1:] == ('(all)',) and all(math.isnan(p[0]) for p in points):
      for _, _, mean, _ in points:
        if mean is not None:
          ax.axhline(mean, linestyle='--', linewidth=1, color='gray', label=name[: -len(', (all)')])
      continue
    points = sorted(p for p in points if p[2] is not None)
    if not points:
      continue
    xs = [p[0] for p in points]
    ys = [p[2] for p in points]
    err = [p[3] or 0.0 for p in points]
    ax.errorbar(xs, ys, yerr=err, marker='o', capsize=3, label=name)
  if log_x and numeric:
    ax.set_xscale('log')
  if not numeric:
    ax.set_xticks(range(len(x_labels)))
    ax.set_xticklabels(x_labels)
  elif len(x_labels) <= 12:
    ticks = sorted({float(s['_plot_x'][x_axis]) for s in summary if x_axis in s['_plot_x']})
    labels = {
        float(s['_plot_x'][x_axis]): str(s.get(x_axis)) for s in summary if x_axis in s['_plot_x']
    }
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[t] for t in ticks])
    ax.minorticks_off()
  ax.set_xlabel(x_axis)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(True, alpha=0.3)
  if lines:
    ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------ outputs


def _csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction='ignore')
  writer.writeheader()
  for r in rows:
    writer.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in columns})
  return out.getvalue()


def write(
    plans: Sequence[spec_lib.Plan],
    output_dir: str,
    *,
    metric: Optional[str] = None,
    metric_step: Optional[str] = None,
    x_axis: Optional[str] = None,
    line_axes: Optional[Sequence[str]] = None,
    where: Optional[Mapping[str, Sequence[str]]] = None,
    log_x: Optional[bool] = None,
    title: Optional[str] = None,
    states: Optional[Mapping[str, str]] = None,
    name: str = 'results',
) -> Dict[str, str]:
  """Writes `<name>.csv`, `<name>.json`, `<name>.md` and `<name>.png` under `output_dir`.

  Returns:
    `{kind: path}` of the files written.
  """
  first = plans[0].sweep
  metric = metric or first.get('metric')
  if not metric:
    raise ValueError('No metric to collect: set spec.Sweep.metric or pass --metric TASK/NAME.')
  rows = run_rows(plans, metric, metric_step, states)
  if where:
    rows = _where(rows, where)
  axes = _axes(plans)
  by_sweep = len({p.name for p in plans}) > 1
  summary = summarize(rows, axes, by_sweep=by_sweep)
  settings_axes = [a for a in axes if a != spec_lib.SEED_AXIS]
  x_axis = x_axis or first.get('figure_x') or (settings_axes[0] if settings_axes else None)
  if line_axes is None:
    line_axes = first.get('figure_lines')
  if line_axes is None:
    line_axes = [a for a in settings_axes if a != x_axis]
  line_keys = (['sweep'] if by_sweep else []) + [a for a in line_axes if a != x_axis]
  x_labels: List[str] = []
  for p in plans:
    for l in p.sweep.get('axis_labels', {}).get(x_axis, []):
      if l not in x_labels:
        x_labels.append(l)
  fs.makedirs(output_dir)
  paths = {}
  columns = ['sweep', 'run'] + axes + (['state'] if states is not None else []) + ['step', 'value']
  columns += sorted({k for r in rows for k in r if '/' in k})
  paths['csv'] = fs.join(output_dir, f'{name}.csv')
  fs.write_text(paths['csv'], _csv(rows, columns))
  paths['json'] = fs.join(output_dir, f'{name}.json')
  fs.write_text(
      paths['json'],
      json.dumps(
          {
              'metric': metric,
              'metric_step': metric_step or first.get('metric_step', 'final'),
              'runs': [{k: v for k, v in r.items() if k != '_plot_x'} for r in rows],
              'settings': [{k: v for k, v in s.items() if k != '_plot_x'} for s in summary],
          },
          indent=1,
      ),
  )
  step_note = metric_step or first.get('metric_step', 'final')
  text = [f'# {" + ".join(p.name for p in plans)}: {metric} ({step_note} step)', '']
  text.append(markdown_table(summary, axes, metric, by_sweep=by_sweep))
  if x_axis and x_axis in settings_axes and len(settings_axes) >= 2:
    text += ['', pivot_table(summary, line_keys, x_axis, x_labels, metric)]
  paths['md'] = fs.join(output_dir, f'{name}.md')
  fs.write_text(paths['md'], '\n'.join(text))
  if x_axis:
    paths['png'] = fs.join(output_dir, f'{name}.png')
    figure(
        summary,
        x_axis,
        line_keys,
        x_labels,
        paths['png'],
        log_x=first.get('figure_log_x', False) if log_x is None else log_x,
        title=title if title is not None else ' + '.join(p.name for p in plans),
        ylabel=f'{metric} ({step_note})',
    )
  return paths
