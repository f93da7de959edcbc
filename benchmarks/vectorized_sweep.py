"""K prompt-tuning runs as one vectorized job against the same K runs one by one.

    python -m benchmarks.vectorized_sweep            # K = 8, toy "base" backbone, 200 steps
    python -m benchmarks.vectorized_sweep --quick    # K = 4, 20 steps (smoke test)

Both modes are `python -m prompt_tuning.sweep run` of the same spec (a frozen random backbone of
the toy reproduction's "base" size, d_model 128; a 20-token prompt on `toy_heldout_indoor`, batch
32; seeds x learning rates, K runs with one data order) and differ only in the spec's `vectorize`:

* separate: K ordinary `prompt_tuning.train` processes, one after another (the sweep's local
  executor; they share a JAX compilation cache as a sweep's runs do, so only the first compiles);
* vectorized: one `prompt_tuning.sweeps.vectorized` process training the K prompts together.

Measured per mode: the sweep's wall time (process starts, compilation, data pipeline, training,
the final evaluation and checkpoint of every run; the gin validation is skipped in both), the peak
resident memory of the largest process (`getrusage(RUSAGE_CHILDREN)`; the separate runs, one at a
time, each need about that much, so K of them at once need about K times it), and the training
throughput in run-steps per second (each run's `timing/steps_per_second`, times K for the
vectorized job). Writes `benchmarks/VECTORIZED_RESULTS.md` (or --output).
"""

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SPEC = """
from __gin__ import dynamic_registration
from prompt_tuning.sweeps import spec

spec.Sweep:
  name = 'bench'
  gin_files = ['toy/prompt_tuning.gin', 'toy/size_base.gin', 'prompts/random_uniform.gin']
  bindings = {{
      'INITIAL_CHECKPOINT_PATH': {checkpoint!r},
      'MIXTURE_OR_TASK_NAME': 'toy_heldout_indoor',
      'CLASS_LABELS': ['yes', 'no'],
      'PROMPT_LENGTH': 20,
      'PROMPT_STEPS': {steps},
      'BACKBONE_STEPS': 0,
      'EVALUATOR_NUM_EXAMPLES': 64,
      'train/utils.DatasetConfig.seed': 0,
  }}
  axes = {{'lr': {{'utils.create_learning_rate_scheduler.base_learning_rate': [0.1, 0.3]}}}}
  seeds = {seeds}
  metric = 'toy_heldout_indoor/accuracy'
{vectorize}"""


def _backbone(path: str) -> str:
  """A random T5X checkpoint of the toy "base" size (configs/toy/size_base.gin) at step 0."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

  config = t5.get_config(
      't5_1_1_small',
      vocab_size=512,
      emb_dim=128,
      num_heads=4,
      head_dim=32,
      mlp_dim=256,
      num_encoder_layers=2,
      num_decoder_layers=2,
      dropout_rate=0.0,
  )
  x = jnp.ones((1, 4), jnp.int32)
  params = t5.EncoderDecoder(config).init(jax.random.PRNGKey(0), x, x, x, enable_dropout=False)
  out = os.path.join(path, 'checkpoint_0')
  t5x_format.save(out, jax.device_get(params['params']), 0)
  return out


def _measure(argv: List[str]) -> Dict[str, Any]:
  """Runs `argv` (a sweep) as a child; its wall time and the largest resident set of its tree."""
  t0 = time.time()
  proc = subprocess.run(
      argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False
  )
  wall = time.time() - t0
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {
      'returncode': proc.returncode,
      'wall_s': wall,
      'peak_rss_mb': usage.ru_maxrss / 1024.0,
      'tail': proc.stdout.decode(errors='replace')[-3000:],
  }


def _throughput(root: str, k: int, vectorized: bool) -> float:
  """Run-steps per second of the training loops (the last logged rate of each run)."""
  sys.path.insert(0, os.path.join(REPO, 'tests', 'runtime'))
  import runtime_testlib as rt  # pylint: disable=g-import-not-at-top

  rates = []
  for run_dir in sorted(glob.glob(os.path.join(root, 'lr=*'))):
    scalars = rt.read_scalars(os.path.join(run_dir, 'train')).get('timing/steps_per_second', {})
    if scalars:
      rates.append(scalars[max(scalars)])
  if not rates:
    return float('nan')
  if vectorized:  # every run logs the job's rate: K runs advance one step per job step
    return k * sum(rates) / len(rates)
  # One after another: K runs of the same length take sum(1 / rate) per step of each.
  return len(rates) / sum(1.0 / r for r in rates)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--k', type=int, default=None, help='runs (even; default 8, quick 4)')
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--output', default=os.path.join(HERE, 'VECTORIZED_RESULTS.md'))
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--measure', nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.measure:
    print('MEASURE ' + json.dumps(_measure(args.measure)))
    return 0
  k = args.k or (4 if args.quick else 8)
  steps = args.steps or (20 if args.quick else 200)
  if k % 2:
    parser.error('--k must be even (seeds x two learning rates)')
  work = args.workdir or tempfile.mkdtemp(prefix='vectorized_sweep_')
  os.makedirs(work, exist_ok=True)
  checkpoint = _backbone(work)
  env = dict(os.environ)
  env.update({'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'})
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
  )
  results = {}
  load_before = [round(x, 2) for x in os.getloadavg()]
  for mode in ('separate', 'vectorized'):
    spec_path = os.path.join(work, f'{mode}.gin')
    vectorize = "  vectorize = ['lr', 'seed']\n" if mode == 'vectorized' else ''
    with open(spec_path, 'w') as f:
      f.write(
          SPEC.format(
              checkpoint=checkpoint, steps=steps, seeds=list(range(k // 2)), vectorize=vectorize
          )
      )
    root = os.path.join(work, mode)
    shutil.rmtree(root, ignore_errors=True)
    mode_env = dict(env)
    mode_env['JAX_COMPILATION_CACHE_DIR'] = os.path.join(work, f'cache_{mode}')
    mode_env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    sweep = [sys.executable, '-m', 'prompt_tuning.sweep', 'run', spec_path, '--root', root]
    sweep.append('--no_check')
    wrapper = [sys.executable, '-m', 'benchmarks.vectorized_sweep', '--measure'] + sweep
    print(f'[bench] {mode}: {k} runs of {steps} steps', flush=True)
    proc = subprocess.run(
        wrapper, cwd=REPO, env=mode_env, stdout=subprocess.PIPE, text=True, check=True
    )
    line = [l for l in proc.stdout.splitlines() if l.startswith('MEASURE ')][-1]
    res = json.loads(line[len('MEASURE ') :])
    if res['returncode'] != 0:
      print(res['tail'], file=sys.stderr)
      raise SystemExit(f'the {mode} sweep failed')
    res['run_steps_per_s'] = _throughput(root, k, mode == 'vectorized')
    results[mode] = res
    print(
        f"[bench] {mode}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MiB, "
        f"{res['run_steps_per_s']:.2f} run-steps/s",
        flush=True,
    )
  load_after = [round(x, 2) for x in os.getloadavg()]
  sep, vec = results['separate'], results['vectorized']
  text = [
      '# Vectorized runs: K prompts as one job vs K separate runs',
      '',
      f'`python -m benchmarks.vectorized_sweep{" --quick" if args.quick else ""}` on '
      f'{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), '
      f'{time.strftime("%Y-%m-%d %H:%M")}; load average before {load_before}, after {load_after}.',
      f'K = {k} runs (seeds x two learning rates, one data order), {steps} steps each, toy "base" '
      'backbone (d_model 128, 0.92M parameters), 20-token prompts, batch 32, toy_heldout_indoor.',
      '',
      '| | K separate runs, one after another | one vectorized job | separate / vectorized |',
      '|---|---|---|---|',
      f"| sweep wall time (s) | {sep['wall_s']:.1f} | {vec['wall_s']:.1f} | "
      f"{sep['wall_s'] / vec['wall_s']:.2f}x |",
      f"| training throughput (run-steps/s) | {sep['run_steps_per_s']:.2f} | "
      f"{vec['run_steps_per_s']:.2f} | {vec['run_steps_per_s'] / sep['run_steps_per_s']:.2f}x "
      '(vectorized / separate) |',
      f"| peak RSS of the largest process (MiB) | {sep['peak_rss_mb']:.0f} (one run; K at once: "
      f"~{k * sep['peak_rss_mb']:.0f}) | {vec['peak_rss_mb']:.0f} | "
      f"{k * sep['peak_rss_mb'] / vec['peak_rss_mb']:.2f}x (K at once / vectorized) |",
      '',
      "The separate runs share a JAX compilation cache (as a sweep's runs do), so only the first "
      'compiles; each still starts a process, imports TensorFlow and seqio, builds its pipeline '
      "and restores the backbone. Wall times include each run's final evaluation and checkpoint; "
      'the gin validation is skipped in both modes.',
      '',
  ]
  with open(args.output, 'w') as f:
    f.write('\n'.join(text))
  print('\n'.join(text))
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # as the entry points (PROMPT_TUNING_MALLOC set: one restart)
  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  sys.exit(main())
