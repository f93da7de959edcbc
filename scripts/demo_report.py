"""Prints the demo's result table and writes its plot (called by scripts/demo.sh)."""

import argparse
import glob
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plot_metrics  # pylint: disable=g-import-not-at-top

TASK = 'toy_heldout_indoor'


def _accuracy(model_dir: str):
  scalars = plot_metrics.read_scalars(model_dir)
  series = scalars.get(f'inference_eval/{TASK}/eval/accuracy', [])
  if not series:
    raise SystemExit(f'[demo] no inference accuracy found under {model_dir}/inference_eval')
  return series


def _majority_rate() -> float:
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.quiet_startup()  # TensorFlow (through seqio) without its C++ start-up lines
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks.toy  # pylint: disable=g-import-not-at-top,unused-import

  ds = seqio.get_mixture_or_task(TASK).get_dataset(None, split='validation', shuffle=False)
  labels = [ex['targets_pretokenized'].decode() for ex in ds.as_numpy_iterator()]
  return 100.0 * max(labels.count(l) for l in set(labels)) / len(labels)


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument('--prompt_tuning', required=True)
  parser.add_argument('--model_tuning', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--elapsed', type=int, default=None)
  args = parser.parse_args()
  pt = _accuracy(args.prompt_tuning)
  mt = _accuracy(args.model_tuning)
  chance = _majority_rate()
  prompt_npy = sorted(
      glob.glob(
          os.path.join(
              args.prompt_tuning,
              'numpy_checkpoints',
              'checkpoint_*',
              'encoder.prompt.prompt.prompt.npy',
          )
      ),
      key=lambda p: int(p.split('checkpoint_')[-1].split(os.sep)[0]),
  )[-1]
  final_prompt = os.path.join(args.output, 'prompt.npy')
  shutil.copyfile(prompt_npy, final_prompt)
  png = os.path.join(args.output, 'demo_metrics.png')
  plot_metrics.plot(
      {
          'prompt tuning (frozen backbone)': args.prompt_tuning,
          'model tuning (all weights)': args.model_tuning,
      },
      png,
      title=f'Held-out toy task {TASK}',
  )
  fraction = '?'
  log = args.prompt_tuning.rstrip('/') + '.log'
  if os.path.exists(log):
    import re  # pylint: disable=g-import-not-at-top

    m = re.search(r'Trainable parameters: (\d+) of (\d+) \(([\d.]+)%\)', open(log).read())
    if m:
      fraction = f'{float(m.group(3)):.2f}% of {int(m.group(2)):,} weights'
  rows = [
      ('untrained prompt (class-label init, step 0)', pt[0][1]),
      (f'prompt tuning, {pt[-1][0] - pt[0][0]} steps ({fraction} trained)', pt[-1][1]),
      (f'model tuning, {mt[-1][0] - mt[0][0]} steps (all weights trained)', mt[-1][1]),
      ('majority-class baseline', chance),
  ]
  width = max(len(r[0]) for r in rows)
  print()
  print(f'Held-out task {TASK} (validation accuracy, %)')
  print('-' * (width + 12))
  for name, value in rows:
    print(f'{name:<{width}}  {value:8.1f}')
  print('-' * (width + 12))
  print(f'prompt: {final_prompt} (from {prompt_npy})')
  print(f'plot:   {png}')
  if args.elapsed is not None:
    print(f'time:   {args.elapsed} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
