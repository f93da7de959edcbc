"""Prints the cross-lingual demo's table and writes its plot (called by scripts/crosslingual_demo.sh).

Reads the zero-shot evaluation of stage (c) (`EVAL_DIR/metrics.json`, every validation example)
and, for the untrained baseline, the inference evaluation that stage (b) ran before training
(TensorBoard events under `TASK_DIR/inference_eval`, 256 examples per task).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_metrics  # pylint: disable=g-import-not-at-top

TASK_A, TASK_B, TASK_B_A_PROMPT = (
    'toy_xl_indoor_a',
    'toy_xl_indoor_b',
    'toy_xl_indoor_b_with_a_prompt',
)
METRICS = ('accuracy', 'any_language_accuracy', 'target_language')
HEADERS = ('exact label %', 'right answer, either language %', 'answers in the task language %')


def _step0(task_dir: str, task: str):
  scalars = plot_metrics.read_scalars(task_dir)
  out = {}
  for metric in METRICS:
    for tag in (f'inference_eval/{task}/eval/{metric}', f'inference_eval/{task}/{metric}'):
      if tag in scalars:
        out[metric] = sorted(scalars[tag])[0]
        break
  return out


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--task_dir', required=True, help='MODEL_DIR of stage (b)')
  parser.add_argument('--eval_dir', required=True, help='EVAL_OUTPUT_DIR of stage (c)')
  parser.add_argument('--output', required=True)
  parser.add_argument('--timings', default='', help='name=seconds,... of the stages')
  args = parser.parse_args()
  with open(os.path.join(args.eval_dir, 'metrics.json')) as f:
    final = json.load(f)
  step0 = {t: _step0(args.task_dir, t) for t in (TASK_A, TASK_B, TASK_B_A_PROMPT)}
  rows = [
      ('B, B language prompt + task prompt trained in A (swap)', final[TASK_B]),
      ('B, A language prompt + task prompt trained in A (no swap)', final[TASK_B_A_PROMPT]),
      (
          'B, B language prompt + untrained task prompt (step 0)',
          {m: v for m, (_, v) in step0[TASK_B].items()},
      ),
      ('A (source language), A prompts, trained', final[TASK_A]),
      (
          'A (source language), untrained task prompt (step 0)',
          {m: v for m, (_, v) in step0[TASK_A].items()},
      ),
  ]
  width = max(len(r[0]) for r in rows)
  print()
  print('Held-out toy task "is the scene indoors?" (yes/no; chance 50%), validation sets of 500')
  print('(step-0 rows: 256 examples); task prompt trained in language A only')
  line = f'{"inputs, prompts":<{width}}  ' + '  '.join(
      f'{h:>14}' for h in ('exact %', 'either lang %', 'in task lang %')
  )
  print(line)
  print('-' * len(line))
  for name, metrics in rows:
    values = '  '.join(f'{metrics.get(m, float("nan")):14.1f}' for m in METRICS)
    print(f'{name:<{width}}  {values}')
  print('-' * len(line))
  print("exact: the label in the inputs' language; either lang: yes/no right in A or B words;")
  print("in task lang: share of answers that are a label word of the inputs' language.")

  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(10, 4.5))
  labels = [
      'B: swap to\nB prompt',
      'B: keep\nA prompt',
      'B: untrained\ntask prompt',
      'A: trained\n(source)',
      'A: untrained',
  ]
  bar = 0.27
  for j, (metric, header) in enumerate(zip(METRICS, HEADERS)):
    values = [r[1].get(metric, 0.0) for r in rows]
    xs = [i + (j - 1) * bar for i in range(len(rows))]
    ax.bar(xs, values, bar, label=header)
  ax.axhline(50, color='gray', lw=0.8, ls='--')
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels(labels)
  ax.set_ylim(0, 105)
  ax.set_ylabel('%')
  ax.set_title(
      'Factorized prompts: a task prompt learned in toy language A, evaluated in language B'
  )
  ax.legend(loc='upper right', fontsize=8)
  fig.tight_layout()
  png = os.path.join(args.output, 'crosslingual.png')
  fig.savefig(png, dpi=110)
  with open(os.path.join(args.output, 'crosslingual_results.json'), 'w') as f:
    json.dump({name: metrics for name, metrics in rows}, f, indent=1)
  print(f'plot:   {png}')
  if args.timings:
    print(
        'time:   '
        + ', '.join(
            f'{kv.split("=")[0]} {kv.split("=")[1]} s' for kv in args.timings.split(',') if kv
        )
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
