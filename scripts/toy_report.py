"""Tables and the figure of the toy reproduction (scripts/reproduce_toy.sh), from its two sweeps.

    python scripts/toy_report.py --prompt_tuning ROOT --model_tuning ROOT --output DIR \
        [--elapsed SECONDS] [--load "1.2, 1.1, 1.0"]

Writes `DIR/toy_results.md` (the tables, with mean ± sample standard deviation over seeds) and
`DIR/toy_trends.png`: per held-out task, the paper's Figure 1 (prompt tuning against model tuning
by model size) and Figure 3(a)/(b) (prompt length, prompt initialization, by model size). It also
prints, for each of the paper's trends, what the numbers say (a trend "holds" here only when the
means move the paper's way at every size or step; the standard deviations are in the tables).
"""

import argparse
import io
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prompt_tuning import fs  # pylint: disable=g-import-not-at-top,wrong-import-position
from prompt_tuning.sweeps import collect  # pylint: disable=g-import-not-at-top,wrong-import-position
from prompt_tuning.sweeps import spec as spec_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

Key = Tuple[str, ...]


def _summary(plan: spec_lib.Plan, axes: Sequence[str]) -> Dict[Key, dict]:
  rows = collect.run_rows([plan])
  out = {}
  for s in collect.summarize(rows, plan.axes):
    out[tuple(s[a] for a in axes)] = s
  return out


def _cell(s: Optional[dict]) -> str:
  if not s or s['mean'] is None:
    return '-'
  return f"{s['mean']:.1f}" + (f" ± {s['std']:.1f}" if s['std'] is not None else '')


def _table(title, row_label, rows, columns, get) -> str:
  lines = [f'**{title}**', '', f'| {row_label} | ' + ' | '.join(columns) + ' |']
  lines.append('|---|' + '---|' * len(columns))
  for r in rows:
    lines.append(f'| {r} | ' + ' | '.join(_cell(get(r, c)) for c in columns) + ' |')
  return '\n'.join(lines) + '\n'


def _mean(s: Optional[dict]) -> float:
  return s['mean'] if s and s['mean'] is not None else math.nan


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--prompt_tuning', required=True)
  parser.add_argument('--model_tuning', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--elapsed', type=float, default=None)
  parser.add_argument('--load', default=None)
  parser.add_argument('--command', default='scripts/reproduce_toy.sh')
  args = parser.parse_args(argv)

  pt = spec_lib.load_plan(args.prompt_tuning)
  mt = spec_lib.load_plan(args.model_tuning)
  labels = pt.sweep['axis_labels']
  tasks, sizes = labels['task'], labels['size']
  lengths, inits = labels['length'], labels['init']
  pts = _summary(pt, ['task', 'size', 'length', 'init'])
  mts = _summary(mt, ['task', 'size'])
  n_pt = sum(1 for r in collect.run_rows([pt]) if r['value'] is not None)
  n_mt = sum(1 for r in collect.run_rows([mt]) if r['value'] is not None)
  default_length = '20' if '20' in lengths else lengths[-1]
  default_init = 'class_label' if 'class_label' in inits else inits[-1]

  text = ['# Toy reproduction of the Power-of-Scale trends', '']
  meta = f'`{args.command}`: {n_pt} prompt-tuning runs and {n_mt} model-tuning runs'
  if args.elapsed is not None:
    meta += f', {args.elapsed / 60:.1f} minutes'
  if args.load:
    meta += f' (load average at the end: {args.load})'
  text += [meta + '. Validation accuracy (%), mean ± standard deviation over seeds.', '']
  findings: List[str] = []
  for task in tasks:
    text.append(f'## Held-out task `toy_heldout_{task}`\n')
    text.append(
        _table(
            f'Prompt tuning (length {default_length}, {default_init} init) vs model tuning',
            'method',
            ['prompt tuning', 'model tuning'],
            sizes,
            lambda r, c: (
                pts.get((task, c, default_length, default_init))
                if r == 'prompt tuning'
                else mts.get((task, c))
            ),
        )
    )
    text.append(
        _table(
            f'Prompt length ({default_init} init)',
            'length',
            lengths,
            sizes,
            lambda r, c: pts.get((task, c, r, default_init)),
        )
    )
    text.append(
        _table(
            f'Prompt initialization (length {default_length})',
            'init',
            inits,
            sizes,
            lambda r, c: pts.get((task, c, default_length, r)),
        )
    )
    # The paper's trends, as the numbers here show them.
    gaps = [
        _mean(mts.get((task, s))) - _mean(pts.get((task, s, default_length, default_init)))
        for s in sizes
    ]
    findings.append(
        f'{task}: model tuning minus prompt tuning by size {sizes}: '
        + ', '.join(f'{g:+.1f}' for g in gaps)
        + (
            " (falls as size grows: prompt tuning gains on model tuning, the paper's trend)"
            if _decreasing(gaps)
            else " (does not fall steadily with size: the paper's trend does not show)"
        )
    )
    for s in sizes:
      by_len = [_mean(pts.get((task, s, l, default_init))) for l in lengths]
      findings.append(
          f'{task}, {s}: accuracy by prompt length {lengths}: '
          + ', '.join(f'{v:.1f}' for v in by_len)
      )
    spreads = []
    for s in sizes:
      by_init = [_mean(pts.get((task, s, default_length, i))) for i in inits]
      spreads.append(max(by_init) - min(by_init))
      findings.append(
          f'{task}, {s}: accuracy by initialization {inits}: '
          + ', '.join(f'{v:.1f}' for v in by_init)
      )
    findings.append(
        f'{task}: spread between initializations by size: '
        + ', '.join(f'{v:.1f}' for v in spreads)
        + (
            " (shrinks as size grows: the paper's trend)"
            if _decreasing(spreads)
            else " (does not shrink steadily with size: the paper's trend does not show)"
        )
    )
  text.append('## What the numbers say\n')
  text += [f'- {f}' for f in findings]
  text.append('')
  fs.makedirs(args.output)
  md = os.path.join(args.output, 'toy_results.md')
  fs.write_text(md, '\n'.join(text))
  png = os.path.join(args.output, 'toy_trends.png')
  _figure(png, tasks, sizes, lengths, inits, pts, mts, pt, default_length, default_init)
  print('\n'.join(text))
  print(f'tables: {md}\nfigure: {png}')
  return 0


def _decreasing(values: Sequence[float]) -> bool:
  vals = [v for v in values if not math.isnan(v)]
  return len(vals) >= 2 and all(b < a for a, b in zip(vals, vals[1:]))


def _figure(path, tasks, sizes, lengths, inits, pts, mts, plan, default_length, default_init):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  xs = {}
  for r in plan.runs:
    if 'size' in r.plot_x:
      xs[r.settings['size']] = r.plot_x['size']
  x = [xs.get(s, i + 1) for i, s in enumerate(sizes)]
  fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.8 * len(tasks)), squeeze=False)

  def line(ax, getter, label, **kw):
    stats = [getter(s) for s in sizes]
    ys = [_mean(s) for s in stats]
    err = [(s['std'] or 0.0) if s and s['mean'] is not None else 0.0 for s in stats]
    ax.errorbar(x, ys, yerr=err, marker='o', capsize=3, label=label, **kw)

  for row, task in enumerate(tasks):
    ax = axes[row][0]
    line(ax, lambda s: pts.get((task, s, default_length, default_init)), 'prompt tuning')
    line(ax, lambda s: mts.get((task, s)), 'model tuning', linestyle='--')
    ax.set_title(f'{task}: prompt vs model tuning')
    ax = axes[row][1]
    for l in lengths:
      line(ax, lambda s, l=l: pts.get((task, s, l, default_init)), f'length {l}')
    ax.set_title(f'{task}: prompt length ({default_init})')
    ax = axes[row][2]
    for i in inits:
      line(ax, lambda s, i=i: pts.get((task, s, default_length, i)), i)
    ax.set_title(f'{task}: initialization (length {default_length})')
    for ax in axes[row]:
      ax.set_xscale('log')
      ax.set_xticks(x)
      ax.set_xticklabels([f'{s}\n{v / 1e6:.2f}M' for s, v in zip(sizes, x)])
      ax.minorticks_off()
      ax.set_ylabel('validation accuracy (%)')
      ax.grid(True, alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  fs.write_bytes(path, buffer.getvalue())


if __name__ == '__main__':
  sys.exit(main())
