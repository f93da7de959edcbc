"""Where the time goes: per-op profiles of one benchmark section, ours (XLA) beside PEFT (torch).

    python -m benchmarks.profile --workdir W --section train --prompt-length 100 --threads 1
    python -m benchmarks.profile --workdir W --section decode --framework ours --dump-hlo W/hlo

`W` must hold the benchmark checkpoint (`python -m benchmarks.bench_peft --job prepare:0
--workdir W --out W/prepare.json`, or a `benchmarks.run --keep-workdir` workdir's `full/`).

Each framework runs in its own process (`--framework both`, the default, starts them one after the
other), builds the section exactly as its benchmark worker does (`bench_ours.py`,
`bench_peft.py`), warms up, and then profiles `--steps` calls (a training step, a scoring call of
the whole batch, or one greedy decode) one after the other:

* ours: `jax.profiler` traces every XLA thunk (fusion, matmul, copy, loop); the compiled HLO's
  metadata names the model operation each thunk came from (`.../encoder/layers_3/mlp/wi_0/...`,
  forward or `transpose(...)` backward);
* PEFT: `torch.profiler` self time of every aten op, with input shapes.

Both are reduced to the same categories (weight matmuls, attention matmuls, softmax, normalisation,
elementwise, layout copies, gathers and cache updates, loss/logits) per call. **Per op the
minimum over the calls is kept**: other processes on the machine only ever lengthen an op, so the
sum of per-op minima is a figure that load hardly moves, unlike the wall time of a call (both are
reported, with the load average). Run with `--threads 1` (and `taskset -c N`) for one core: the
sum of op times is then the compute time of the call.

Results go to `--out` (JSON) and a markdown table on stdout (`--markdown` to a file).
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CATEGORIES = (
    'weight matmuls',
    'attention matmuls',
    'logits matmul',
    'softmax',
    'normalisation',
    'elementwise',
    'layout copies',
    'gather / scatter / cache',
    'loss',
    'optimizer',
    'other',
)

# -------------------------------------------------------------------------------- ours (XLA)

_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+?(?:\{[^}]*\})?) ([\w-]+)\((.*)$', re.M)
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) \(.*?\) -> .*? \{$', re.M)


def hlo_ops(hlo: str) -> Dict[str, Dict[str, Any]]:
  """Instruction name -> `{'shape', 'opcode', 'op_name', 'kind', 'has_dot', 'computation'}`."""
  # Which fused computations contain a dot (a fusion's own opcode says nothing about it).
  comp_has_dot, comp_of_line = {}, []
  current = None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      comp_has_dot.setdefault(current, False)
    elif current and re.search(r' (dot|convolution)\(', line):
      comp_has_dot[current] = True
    comp_of_line.append(current)
  ops = {}
  lines = hlo.splitlines()
  for i, line in enumerate(lines):
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    kind = re.search(r'"kind":"([^"]*)"', rest) or re.search(r'kind=(\w+)', rest)
    calls = re.search(r'calls=%([\w.\-]+)', rest)
    has_dot = opcode in ('dot', 'convolution') or bool(calls and comp_has_dot.get(calls.group(1)))
    ops[name] = {
        'shape': shape,
        'opcode': opcode,
        'op_name': op_name.group(1) if op_name else '',
        'kind': kind.group(1) if kind else '',
        'has_dot': has_dot,
        'computation': comp_of_line[i],
    }
  return ops


def _path(op_name: str) -> str:
  """`jit(f)/transpose(jvp(M))/M.encode/encoder/layers_3/mlp/wi_0/dot_general` ->
  `encoder/layers_*/mlp/wi_0/dot_general`."""
  path = re.sub(r'layers_\d+', 'layers_*', op_name)
  path = re.sub(r'^jit\([^)]*\)/', '', path)
  path = re.sub(r'(transpose|jvp|checkpoint|remat|while|body|cond)\(|\)', '', path)
  path = re.sub(r'\b[A-Z]\w*(\.\w+)?/', '', path)  # Flax module class names (M.encode/).
  path = re.sub(r'^(while/)?(body/)?', '', path)
  return path.strip('/')


def xla_category(info: Dict[str, Any]) -> str:
  # Without the outer `jit(<function name>)/`, which says nothing about the op.
  name, opcode = re.sub(r'^jit\([^)]*\)/', '', info['op_name']), info['opcode']
  leaf = name.rsplit('/', 1)[-1]
  if info['has_dot']:
    if 'logits_dense' in name or '/attend' in name:
      return 'logits matmul'
    if re.search(r'/(query|key|value|out|wi|wi_\d|wo)[/+]', name):
      return 'weight matmuls'
    return 'attention matmuls'
  if (
      opcode in ('copy', 'transpose')
      or 'transpose' in info.get('name', '')
      or leaf
      in (
          'reshape',
          'transpose',
          'concatenate',
          'copy',
      )
  ):
    return 'layout copies'
  if 'layer_norm' in name or '_norm/' in name:
    return 'normalisation'
  if re.search(r'/(reduce_max|exp|div|softmax|reduce_sum)$', name) and 'attention' in name:
    return 'softmax'
  if 'adafactor' in name.lower() or 'optimizer' in name.lower() or 'apply_grad' in name:
    return 'optimizer'
  if re.search(r'cross_entropy|log_softmax|logsumexp|one_hot|loss', name):
    return 'loss'
  if leaf in ('gather', 'scatter', 'dynamic_update_slice', 'dynamic_slice', 'select_n', 'take'):
    return 'gather / scatter / cache'
  if opcode in ('while', 'conditional', 'call', 'custom-call', 'after-all', 'copy-start'):
    return 'other'
  if opcode == 'fusion' or leaf in ('mul', 'add', 'tanh', 'sub', 'pow', 'integer_pow', 'add_any'):
    return 'elementwise'
  return 'other'


def _trace_events(trace_dir: str):
  from jax._src.lib import _profile_data  # pylint: disable=g-import-not-at-top

  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise RuntimeError(f'jax.profiler wrote no trace under {trace_dir}')
  data = _profile_data.ProfileData.from_file(max(files, key=os.path.getmtime))
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        yield line.name, ev.name, ev.start_ns, ev.duration_ns


def profile_ours(args, shapes) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top

  from benchmarks import bench_ours  # pylint: disable=g-import-not-at-top

  bench_args = argparse.Namespace(
      workdir=args.workdir,
      dtype=args.dtype,
      dropout=0.0,
      remat=None,
      compilation_cache=None,
      prompt_length=args.prompt_length,
  )
  if args.section == 'train':
    # The one-executable step, also where `Trainer` would split it (`trainer.SplitTrainStep`, the
    # default on an Intel CPU under tcmalloc): two executables' op names would mix in one trace.
    import gin  # pylint: disable=g-import-not-at-top

    from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top,unused-import

    with gin.unlock_config():
      gin.bind_parameter('training_forward_compiler_options.cpu_float32_dots', 'ynnpack')
    bench = bench_ours.TrainBench(bench_args, shapes)
    bench.setup()
    placed = bench.trainer.place_batch(bench.batches[0])
    compiled = bench.step_fn.lower(
        bench.trainer.train_state, placed, bench.trainer._base_rng  # pylint: disable=protected-access
    ).compile()
    call = lambda: bench._run(1)  # pylint: disable=protected-access
  elif args.section == 'serve':
    bench = bench_ours.ServeBench(bench_args, shapes)
    bench.setup()
    fn, params, batch = bench.fns[args.variant or 'single']
    compiled = fn.lower(params, batch).compile()
    call = lambda: jax.block_until_ready(fn(params, batch))
  elif args.section == 'decode':
    bench = bench_ours.DecodeBench(bench_args, shapes)
    bench.setup()
    compiled = bench.fn.lower(bench.params, bench.batch).compile()
    call = lambda: jax.block_until_ready(bench.fn(bench.params, bench.batch))
  else:
    raise SystemExit(f'unknown section {args.section!r}')
  hlo = compiled.as_text()
  flops = (compiled.cost_analysis() or {}).get('flops')
  if isinstance(compiled.cost_analysis(), (list, tuple)):
    flops = compiled.cost_analysis()[0].get('flops')
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
    with open(os.path.join(args.dump_hlo, f'ours_{args.section}.hlo.txt'), 'w') as f:
      f.write(hlo)
  call()
  rows, walls = xla_op_times(call, hlo, args.steps)
  return {'framework': 'ours', 'ops': rows, 'wall_s': walls, 'flops': flops}


def xla_op_times(call, hlo: str, steps: int) -> Tuple[List[Dict[str, Any]], List[float]]:
  """Profiles `steps` calls of `call` (compiled to `hlo`): per XLA op, its time in each call.

  Returns `(rows, wall times)`; a row has the op, its model path, category, and the minimum and
  median over the calls of its time in a call (ms).
  """
  import jax  # pylint: disable=g-import-not-at-top

  ops = hlo_ops(hlo)
  trace_dir = tempfile.mkdtemp(prefix='pt_profile_')
  walls = []
  try:
    jax.profiler.start_trace(trace_dir)
    for i in range(steps):
      with jax.profiler.TraceAnnotation(f'profile_call_{i}'):
        t0 = time.perf_counter()
        call()
        walls.append(time.perf_counter() - t0)
    jax.profiler.stop_trace()
    events = list(_trace_events(trace_dir))
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  windows = sorted(
      (start, start + dur, int(name.rsplit('_', 1)[1]))
      for _, name, start, dur in events
      if name.startswith('profile_call_')
  )
  per_call = [collections.Counter() for _ in windows]
  counts = collections.Counter()
  for line, name, start, dur in events:
    if name not in ops or not line.startswith('tf_XLA'):
      continue
    for k, (lo, hi, _) in enumerate(windows):
      if lo <= start <= hi:
        per_call[k][name] += dur
        if k == 0:
          counts[name] += 1
        break
  rows = []
  for name in set().union(*per_call) if per_call else ():
    times = [c.get(name, 0) for c in per_call]
    info = dict(ops[name], name=name)
    rows.append(
        {
            'op': name,
            'path': _path(info['op_name']),
            'backward': 'transpose(' in info['op_name'],
            'category': xla_category(info),
            'shape': info['shape'],
            'calls_per_step': counts.get(name, 0),
            'min_ms': min(times) / 1e6,
            'median_ms': common.median(times) / 1e6,
        }
    )
  return rows, walls


# ------------------------------------------------------------------------------ PEFT (torch)

_TORCH_CATEGORIES = (
    (r'^aten::(bmm|baddbmm)$|scaled_dot_product|flash_attention', 'attention matmuls'),
    (r'^aten::(mm|addmm|linear|matmul)$', 'weight matmuls'),
    (r'softmax', 'softmax'),
    (r'^aten::(mean|rsqrt|pow|var)$', 'normalisation'),
    (
        r'^aten::(copy_|_to_copy|contiguous|clone|transpose|permute|view|reshape|_unsafe_view|cat|t|expand)$',
        'layout copies',
    ),
    (
        r'^aten::(embedding|embedding_backward|index_select|gather|scatter|index|index_put_)',
        'gather / scatter / cache',
    ),
    (r'(nll_loss|cross_entropy|log_softmax)', 'loss'),
    (r'(Adafactor|optimizer|Optimizer)', 'optimizer'),
    (
        r'^aten::(mul|add|sub|div|tanh|gelu|add_|mul_|where|masked_fill|neg|exp|sum|ones_like|fill_|zero_)',
        'elementwise',
    ),
)


def torch_category(name: str, shapes) -> str:
  for pattern, category in _TORCH_CATEGORIES:
    if re.search(pattern, name):
      if (
          category == 'weight matmuls'
          and shapes
          and any(s and s[-1] == 32128 for s in shapes if isinstance(s, list))
      ):
        return 'logits matmul'
      return category
  return 'other'


def profile_peft(args, shapes) -> Dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile, record_function  # pylint: disable=g-import-not-at-top

  from benchmarks import bench_peft  # pylint: disable=g-import-not-at-top

  bench_args = argparse.Namespace(
      workdir=args.workdir,
      dtype=args.dtype,
      dropout=0.0,
      threads=args.threads,
      prompt_length=args.prompt_length,
  )
  if args.section == 'train':
    bench = bench_peft.TrainBench(bench_args, shapes)
    bench.setup()
    call = lambda: bench._run(1)  # pylint: disable=protected-access
  elif args.section == 'serve':
    bench = bench_peft.ServeBench(bench_args, shapes)
    bench.setup()
    call = bench.fns[args.variant or 'single']
  elif args.section == 'decode':
    bench = bench_peft.DecodeBench(bench_args, shapes)
    bench.setup()
    call = bench.gen
  else:
    raise SystemExit(f'unknown section {args.section!r}')
  call()
  walls = []
  with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    for i in range(args.steps):
      with record_function(f'profile_call_{i}'):
        t0 = time.perf_counter()
        call()
        walls.append(time.perf_counter() - t0)
  events = list(prof.events())
  windows = sorted(
      (e.time_range.start, e.time_range.end, e.name)
      for e in events
      if e.name.startswith('profile_call_')
  )
  per_call = [collections.Counter() for _ in windows]
  info, counts = {}, collections.Counter()
  for e in events:
    if not e.name.startswith('aten::') and not e.name.startswith('Optimizer'):
      continue
    key = (e.name, str(e.input_shapes))
    for k, (lo, hi, _) in enumerate(windows):
      if lo <= e.time_range.start <= hi:
        per_call[k][key] += e.self_cpu_time_total * 1e3  # us -> ns
        if k == 0:
          counts[key] += 1
        info[key] = e.input_shapes
        break
  rows = []
  for key in set().union(*per_call) if per_call else ():
    times = [c.get(key, 0) for c in per_call]
    rows.append(
        {
            'op': key[0],
            'path': key[0],
            'backward': False,
            'category': torch_category(key[0], info.get(key)),
            'shape': key[1][:120],
            'calls_per_step': counts.get(key, 0),
            'min_ms': min(times) / 1e6,
            'median_ms': common.median(times) / 1e6,
        }
    )
  del torch
  return {'framework': 'peft', 'ops': rows, 'wall_s': walls}


# ------------------------------------------------------------------------------- reporting


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
  """Per-category sums of the per-op minima (ms per call), and the top ops."""
  by_cat = collections.Counter()
  by_path = collections.Counter()
  for r in result['ops']:
    by_cat[r['category']] += r['min_ms']
    key = (
        ('bwd ' if r['backward'] else '')
        + r['path']
        + (f' {r["shape"]}' if result['framework'] == 'peft' else '')
    )
    by_path[(r['category'], key)] += r['min_ms']
  total = sum(by_cat.values())
  return {
      'framework': result['framework'],
      'sum_of_op_minima_ms': total,
      'wall_ms_min': 1e3 * min(result['wall_s']) if result['wall_s'] else float('nan'),
      'wall_ms_median': 1e3 * common.median(result['wall_s']),
      'categories_ms': dict(by_cat),
      'top': [{'category': c, 'op': k, 'ms': v} for (c, k), v in by_path.most_common(25)],
      'flops': result.get('flops'),
  }


def markdown(summaries: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
  lines = [
      f'Profile of `{meta["section"]}` (P={meta["prompt_length"]}, {meta["shapes"]} shapes, '
      f'{meta["threads"] or "all"} thread(s), {meta["steps"]} calls; load average '
      f'{meta["load_start"]} -> {meta["load_end"]}; {meta.get("cpu", "")}). Milliseconds per '
      'call: per op the minimum over the calls, summed.',
      '',
      '| category | ' + ' | '.join(s['framework'] for s in summaries) + ' |',
      '|---|' + '---|' * len(summaries),
  ]
  for cat in CATEGORIES:
    cells = []
    for s in summaries:
      v = s['categories_ms'].get(cat, 0.0)
      total = s['sum_of_op_minima_ms'] or float('nan')
      cells.append(f'{v:,.1f} ({100 * v / total:.0f}%)')
    lines.append(f'| {cat} | ' + ' | '.join(cells) + ' |')
  lines.append(
      '| **sum of op minima** | '
      + ' | '.join(f'**{s["sum_of_op_minima_ms"]:,.1f}**' for s in summaries)
      + ' |'
  )
  lines.append(
      '| wall time per call (min / median) | '
      + ' | '.join(f'{s["wall_ms_min"]:,.1f} / {s["wall_ms_median"]:,.1f}' for s in summaries)
      + ' |'
  )
  for s in summaries:
    lines += ['', f'Top ops, {s["framework"]} (ms per call):', '']
    for t in s['top'][:15]:
      lines.append(f'- {t["ms"]:8.1f}  [{t["category"]}] {t["op"]}')
  return '\n'.join(lines) + '\n'


def _set_threads(threads: Optional[int]) -> None:
  if threads:
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '')
        + f' --xla_cpu_multi_thread_eigen={"false" if threads == 1 else "true"}'
        f' intra_op_parallelism_threads={threads}'
    ).strip()
    os.environ['OMP_NUM_THREADS'] = str(threads)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--shapes', default='full', choices=sorted(common.SHAPES))
  parser.add_argument('--section', default='train', choices=('train', 'serve', 'decode'))
  parser.add_argument('--variant', default=None, help="serve: 'single' (default) or 'mixed'")
  parser.add_argument('--prompt-length', type=int, default=100)
  parser.add_argument('--framework', default='both', choices=('ours', 'peft', 'both'))
  parser.add_argument('--steps', type=int, default=5, help='profiled calls (after one warm-up)')
  parser.add_argument('--threads', type=int, default=None, help='1: one core, one thread')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--dump-hlo', default=None, help='directory for the compiled HLO (ours)')
  parser.add_argument('--out', default=None, help='JSON output')
  parser.add_argument('--markdown', default=None, help='markdown output (default: stdout)')
  args = parser.parse_args(argv)
  _set_threads(args.threads)
  from benchmarks import load_guard  # pylint: disable=g-import-not-at-top

  meta = {k: getattr(args, k) for k in ('section', 'prompt_length', 'shapes', 'threads', 'steps')}
  meta['load_start'] = common.load_avg()
  meta['cpu'] = load_guard.cpu_info().get('model')
  if args.framework == 'both':
    results = []
    for fw in ('ours', 'peft'):
      with tempfile.NamedTemporaryFile(suffix='.json') as tmp:
        cmd = [sys.executable, '-m', 'benchmarks.profile'] + [
            a for a in (argv if argv is not None else sys.argv[1:])
        ]
        cmd = [c for c in cmd]
        cmd += ['--framework', fw, '--out', tmp.name, '--markdown', os.devnull]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
        subprocess.run(cmd, check=True, cwd=REPO, env=env)
        with open(tmp.name) as f:
          results.append(json.load(f)['summary'])
    summaries = results
  else:
    shapes = common.SHAPES[args.shapes]
    result = (profile_ours if args.framework == 'ours' else profile_peft)(args, shapes)
    summaries = [summarize(result)]
    if args.out:
      common.write_json(args.out, {'meta': meta, 'summary': summaries[0], 'ops': result['ops']})
  meta['load_end'] = common.load_avg()
  text = markdown(summaries, meta)
  if args.framework == 'both' and args.out:
    common.write_json(args.out, {'meta': meta, 'summaries': summaries})
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(text)
  else:
    print(text)
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # as the entry points (PROMPT_TUNING_MALLOC set: one restart)
  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  sys.exit(main())
