"""Interleaved A/B timing of backbone layouts and XLA CPU options, in one process.

    taskset -c 1 python -m benchmarks.ab --workdir W --section train --threads 1 \
        --variant base:fuse_kernels=0,fold_cross_attention=0 --variant fast: \
        --variant 'vec512:@xla_cpu_prefer_vector_width=512'

A variant is `NAME:SETTINGS`, SETTINGS a comma-separated list of `T5Config` fields
(`fuse_kernels=0`) and XLA debug options prefixed with `@` (`@xla_cpu_enable_fast_math=true`,
passed to `compile(compiler_options=...)`, so several option sets coexist in one process; a list
value is written `A|B`). Every
variant is compiled for the same inputs, then the calls go round-robin (the order reversed every
round) for `--rounds` rounds, so a burst of load from other processes hits all variants alike.

Per variant: the minimum and median wall time of a call, the median process CPU time of a call
(with `--threads 1` the compute time, hardly affected by being descheduled), and the ratio to the
first variant, as the median over rounds of the per-round ratios. The benchmark's workloads:

* `train`: value and gradient of the training loss (mean token cross entropy) w.r.t. the prompt,
  frozen backbone (the train step without the optimizer's few element-wise ops);
* `loss`: the training loss alone (the train step's forward);
* `score`: the scoring forward of the serving batch (`EncoderDecoderModel.score_batch`);
* `decode`: greedy decoding of the decode batch (`predict_batch_with_aux`).

Outputs must agree between variants (checked: the largest relative difference is printed).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Tuple

from benchmarks import common


def parse_variant(text: str) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
  """`'name:fuse_kernels=0,@xla_flag=v'` -> `(name, config overrides, compiler options)`."""
  name, _, spec = text.partition(':')
  config, options = {}, {}
  for item in filter(None, spec.split(',')):
    key, _, value = item.partition('=')
    if key.startswith('@'):
      value = value.replace('|', ',')  # a list-valued XLA option: `@opt=A|B`
      low = value.lower()
      options[key[1:]] = True if low == 'true' else False if low == 'false' else value
    else:
      config[key] = {'0': False, '1': True, 'false': False, 'true': True}.get(value.lower(), value)
  return name, config, options


def _setup(args, shapes):
  """`(base config, params, make_fn(config) -> (fn, fn_args))` for the section."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import bench_ours  # pylint: disable=g-import-not-at-top
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top

  bench_args = argparse.Namespace(
      workdir=args.workdir,
      dtype=args.dtype,
      dropout=0.0,
      remat=None,
      prompt_length=args.prompt_length,
  )
  p = args.prompt_length
  if args.section in ('train', 'loss'):
    config, params = bench_ours._load(bench_args, p)  # pylint: disable=protected-access
    batch = {k: jnp.asarray(v) for k, v in common.train_batches(shapes)[0].items()}
    flat = params_lib.flatten_params(params)
    prompt_key = 'encoder/prompt/prompt/prompt'
    prompt = jnp.asarray(flat.pop(prompt_key))
    frozen = jax.device_put(params_lib.unflatten_params(flat))

    def make(cfg):
      model = bench_ours._model(cfg, p, with_optimizer=False)  # pylint: disable=protected-access

      def loss(prompt, frozen, batch):
        tree = params_lib.flatten_params(frozen)
        tree[prompt_key] = prompt
        return model.loss_fn(params_lib.unflatten_params(tree), batch, None)[0]

      if args.section == 'loss':  # the training step's forward alone
        return loss, (prompt, frozen, batch)
      return jax.value_and_grad(loss), (prompt, frozen, batch)

  elif args.section == 'score':
    config, params = bench_ours._load(bench_args, p)  # pylint: disable=protected-access
    batch = {k: jnp.asarray(v) for k, v in common.serve_batch(shapes).items() if k != 'prompt_ids'}
    params = jax.device_put(params)

    def make(cfg):
      model = bench_ours._model(cfg, p, with_optimizer=False)  # pylint: disable=protected-access
      return model.score_batch, (params, batch)

  elif args.section == 'decode':
    config, params = bench_ours._load(bench_args, p)  # pylint: disable=protected-access
    params = jax.device_put(params)
    enc = common.decode_inputs(shapes)
    batch = {
        'encoder_input_tokens': jnp.asarray(enc),
        'decoder_input_tokens': jnp.zeros((enc.shape[0], shapes.decode_tokens), jnp.int32),
    }

    def make(cfg):
      model = bench_ours._model(cfg, p, with_optimizer=False)  # pylint: disable=protected-access

      def predict(prm, bt):
        return model.predict_batch_with_aux(
            prm, bt, decoder_params={'topk': 1, 'logit_callback_fn': bench_ours._no_eos}  # pylint: disable=protected-access
        )[0]

      return predict, (params, batch)

  else:
    raise SystemExit(f'unknown section {args.section!r}')
  del np
  return config, make


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--shapes', default='full', choices=sorted(common.SHAPES))
  parser.add_argument('--section', default='train', choices=('train', 'loss', 'score', 'decode'))
  parser.add_argument('--prompt-length', type=int, default=100)
  parser.add_argument('--variant', action='append', required=True, help='NAME:SETTINGS')
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--threads', type=int, default=None, help='1: one thread')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument(
      '--profile',
      type=int,
      default=0,
      help='also profile this many calls of each variant: the sum over XLA ops of their minimum '
      'time, per category (benchmarks.profile), a figure load hardly moves',
  )
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.threads:
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '')
        + f' --xla_cpu_multi_thread_eigen={"false" if args.threads == 1 else "true"}'
        f' intra_op_parallelism_threads={args.threads}'
    ).strip()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  shapes = common.SHAPES[args.shapes]
  base, make = _setup(args, shapes)
  variants = []
  for text in args.variant:
    name, overrides, options = parse_variant(text)
    cfg = dataclasses.replace(base, **overrides)
    fn, fn_args = make(cfg)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*fn_args).compile(compiler_options=options or None)
    out = jax.block_until_ready(compiled(*fn_args))
    print(f'{name}: compiled in {time.perf_counter() - t0:.1f} s', flush=True)
    variants.append((name, compiled, fn_args, out))
  ref = jax.tree_util.tree_leaves(variants[0][3])
  for name, _, _, out in variants[1:]:
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30)
        for a, b in zip(jax.tree_util.tree_leaves(out), ref)
    ]
    print(f'{name}: largest relative difference to {variants[0][0]}: {max(diffs):.2e}')
  wall = {v[0]: [] for v in variants}
  cpu = {v[0]: [] for v in variants}
  load = [common.load_avg()]
  for r in range(args.rounds):
    order = variants if r % 2 == 0 else variants[::-1]
    for name, compiled, fn_args, _ in order:
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(compiled(*fn_args))
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  load.append(common.load_avg())
  first = variants[0][0]
  rows = []
  print(f'\nload average {load[0]} -> {load[1]}; {args.rounds} rounds; section {args.section}')
  print(
      f'{"variant":>14} {"wall min":>9} {"wall med":>9} {"cpu med":>9} '
      f'{"wall ratio":>10} {"cpu ratio":>10}'
  )
  for name, *_ in variants:
    wr = common.median([a / b for a, b in zip(wall[name], wall[first])])
    cr = common.median([a / b for a, b in zip(cpu[name], cpu[first])])
    rows.append(
        {
            'variant': name,
            'wall_s': wall[name],
            'cpu_s': cpu[name],
            'wall_ratio': wr,
            'cpu_ratio': cr,
        }
    )
    print(
        f'{name:>14} {min(wall[name]):9.3f} {common.median(wall[name]):9.3f} '
        f'{common.median(cpu[name]):9.3f} {wr:10.3f} {cr:10.3f}'
    )
  if args.profile:
    from benchmarks import profile  # pylint: disable=g-import-not-at-top

    print(f'\nper-op minima over {args.profile} profiled calls (ms per call):')
    sums = {}
    for (name, compiled, fn_args, _), row in zip(variants, rows):
      ops, _ = profile.xla_op_times(
          lambda c=compiled, a=fn_args: jax.block_until_ready(c(*a)),
          compiled.as_text(),
          args.profile,
      )
      summary = profile.summarize({'framework': name, 'ops': ops, 'wall_s': [float('nan')]})
      row['profile'] = summary
      sums[name] = summary
    cats = [c for c in profile.CATEGORIES if any(s['categories_ms'].get(c) for s in sums.values())]
    print(f'{"category":>26} ' + ' '.join(f'{n:>10}' for n in sums))
    for c in cats + ['sum']:
      print(
          f'{c:>26} '
          + ' '.join(
              f'{(s["sum_of_op_minima_ms"] if c == "sum" else s["categories_ms"].get(c, 0.0)):10.1f}'
              for s in sums.values()
          )
      )
  if args.out:
    common.write_json(args.out, {'args': vars(args), 'load': load, 'rows': rows})
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # as the entry points (PROMPT_TUNING_MALLOC set: one restart)
  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  sys.exit(main())
