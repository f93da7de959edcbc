"""Runs the prompt_tuning vs Hugging Face PEFT benchmarks and writes benchmarks/RESULTS.md.

    python -m benchmarks.run            # full CPU benchmark (T5 1.1 small shape, ~15 minutes)
    python -m benchmarks.run --quick    # tiny shapes, one repetition (< 1 minute; smoke test)
    python -m benchmarks.run --sections realistic,bf16   # only those; -> RESULTS.realistic_bf16.md

Needs the `bench` extra (`pip install -e .[bench]`: torch, transformers, peft, psutil).

Every measurement runs in worker processes (`benchmarks/bench_ours.py`, `benchmarks/bench_peft.py`),
one per framework and section, so each reports its own peak resident memory. The two workers of a
comparison are started together and driven in lockstep: both set up, then their timed repetitions
alternate (ours, PEFT, PEFT, ours, ...) and never overlap, so slow phases of a shared machine hit
both. Reported numbers are medians over repetitions; ratios are ratios of those medians (the
range of the ratios of adjacent repetition pairs is given too).

Background load flatters ours (PyTorch loses more to it than XLA), so the run guards against it
(`benchmarks/load_guard.py`): it waits up to `--wait-quiet` seconds for other processes to use at
most `--max-interference` cores and refuses to start otherwise (`--allow-load` overrides); every
comparison records the load average and busiest other processes before and after, and the
interference during its timed repetitions; a loaded comparison is re-run (`--retries`) and, if
still loaded, marked INVALID in RESULTS.md (at the top and in "Run validity"). The CPU model and
its matmul-relevant ISA flags are recorded with every run. The one-core pinned rows are the
figures least sensitive to load.

Where the time goes, per op and side by side: `python -m benchmarks.profile`; interleaved A/B of
backbone layouts and XLA options in one process: `python -m benchmarks.ab`.
"""

import argparse
import datetime
import json
import os
import platform
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import common
from benchmarks import load_guard

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CALL_TIMEOUT_S = 1800


# `--sections`: the main comparison (sections 1-3, pinned runs, GPU), training on realistic
# input lengths (issue 18), bfloat16 on the CPU (issue 18).
SECTIONS = ('main', 'realistic', 'bf16')


class WorkerError(RuntimeError):
  pass


class Worker:
  """A benchmark worker process driven through stdin commands and a reply pipe."""

  def __init__(
      self,
      label: str,
      argv: Sequence[str],
      log_dir: str,
      env: Optional[Dict[str, str]] = None,
      cpus: Optional[Sequence[int]] = None,
  ):
    self.label = label
    read_fd, write_fd = os.pipe()
    self.log_path = os.path.join(log_dir, label + '.log')
    self.log = open(self.log_path, 'w')
    env = dict(os.environ, **(env or {}))
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    env.setdefault('TOKENIZERS_PARALLELISM', 'false')
    env.setdefault('HF_HUB_OFFLINE', '1')
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    self.argv = list(argv) + ['--reply-fd', str(write_fd)]
    self.proc = subprocess.Popen(
        self.argv,
        stdin=subprocess.PIPE,
        stdout=self.log,
        stderr=subprocess.STDOUT,
        pass_fds=(write_fd,),
        text=True,
        cwd=REPO,
        env=env,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    os.close(write_fd)
    self.reply = os.fdopen(read_fd)

  def call(self, cmd: str, timeout: float = CALL_TIMEOUT_S) -> Any:
    try:
      self.proc.stdin.write(cmd + '\n')
      self.proc.stdin.flush()
    except BrokenPipeError as e:
      raise WorkerError(f'{self.label} exited early; see {self.log_path}') from e
    ready, _, _ = select.select([self.reply], [], [], timeout)
    if not ready:
      self.kill()
      raise WorkerError(f'{self.label}: {cmd!r} took over {timeout:.0f} s; see {self.log_path}')
    line = self.reply.readline()
    if not line:
      self.proc.wait(timeout=60)
      raise WorkerError(
          f'{self.label} died during {cmd!r} (exit code {self.proc.returncode}); '
          f'see {self.log_path}'
      )
    msg = json.loads(line)
    if 'error' in msg:
      raise WorkerError(f'{self.label}: {cmd!r} failed:\n{msg["error"]}')
    return msg['result']

  def close(self) -> None:
    try:
      self.proc.stdin.close()
    except OSError:
      pass
    try:
      self.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
      self.kill()
    self.reply.close()
    self.log.close()

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def run_group(
    specs: Sequence[tuple],
    jobs: Sequence[tuple],
    reps: Dict[str, int],
    log_dir: str,
    log=print,
    env: Optional[Dict[str, str]] = None,
    cpus: Optional[Sequence[int]] = None,
    max_interference: float = load_guard.DEFAULT_MAX_INTERFERENCE,
) -> Dict[str, List[Any]]:
  """Runs `jobs` (`(section, P)`) in lockstep on one worker per `(label, argv[, extra env])`.

  Each worker process was started with all the jobs; for each job the workers set up one after
  the other, then their `reps[section]` repetitions alternate. Returns `{label: [result or
  {'error': ...} per job]}`. Every result carries `load`: the load average and busiest other
  processes before and after the job, what other processes and the hypervisor took from the
  machine (or from `cpus`) during its timed repetitions, and the verdict against
  `max_interference` cores (`load_guard.Section`).
  """
  workers = []
  for spec in specs:
    extra = dict(env or {}, **(spec[2] if len(spec) > 2 else {}))
    w = Worker(spec[0], spec[1], log_dir, extra, cpus)
    w.shown_env = {k: v for k, v in extra.items() if k not in ('CUDA_VISIBLE_DEVICES',)}
    w.cpus = cpus
    workers.append(w)
  out: Dict[str, List[Any]] = {w.label: [] for w in workers}
  broken = set()
  try:
    for j, (section, p) in enumerate(jobs):
      guard = load_guard.Section(
          [os.getpid()] + [w.proc.pid for w in workers], max_interference, cpus
      )
      guard.before()
      first = {w.label: len(out[w.label]) for w in workers}
      active = []
      for w in workers:
        if w.label in broken:
          out[w.label].append({'error': f'{w.label} died earlier; see {w.log_path}'})
          continue
        t0 = time.time()
        try:
          w.call(f'setup {j}')
          log(f'  {w.label} {section} P={p}: set up in {time.time() - t0:.0f} s')
          active.append(w)
        except WorkerError as e:
          out[w.label].append({'error': str(e)})
          log(f'  {w.label} {section} P={p}: FAILED ({e})')
          if w.proc.poll() is not None:
            broken.add(w.label)
      failed = set()
      n = reps.get(section, 0)
      if n:
        guard.timed_start()
      for r in range(n):
        for w in (active if r % 2 == 0 else active[::-1]):
          if w.label in failed:
            continue
          try:
            res = w.call(f'rep {j}')
            log(
                f'  {w.label} {section} P={p}: rep {r + 1}/{n} '
                + ', '.join(f'{k} {v:.3f} s' for k, v in res.items())
            )
          except WorkerError as e:
            out[w.label].append({'error': str(e)})
            failed.add(w.label)
            log(f'  {w.label} {section} P={p}: FAILED ({e})')
            if w.proc.poll() is not None:
              broken.add(w.label)
      if n:
        guard.timed_end()
      for w in active:
        if w.label in failed:
          continue
        try:
          res = w.call(f'finish {j}')
          res['command'] = ' '.join(
              ([f'taskset -c {",".join(map(str, w.cpus))} env'] if w.cpus else [])
              + [f'{k}={shlex.quote(v)}' for k, v in sorted(w.shown_env.items())]
              + [shlex.quote(a) for a in w.argv[:-2]]
          )
          out[w.label].append(res)
        except WorkerError as e:
          out[w.label].append({'error': str(e)})
          log(f'  {w.label} {section} P={p}: FAILED ({e})')
      guard.after()
      record = guard.record()
      log(f'  {section} P={p}: load {record["verdict"]}{_load_summary(record)}')
      for w in workers:
        for res in out[w.label][first[w.label] :]:
          if isinstance(res, dict):
            res['load'] = record
  finally:
    for w in workers:
      w.close()
  return out


def _load_summary(record: Dict[str, Any]) -> str:
  during = record.get('during') or {}
  if 'interference_cores' not in during:
    return ''
  top = '; '.join(
      f'{b["command"][:50]} {b["cores"]:.2f}' for b in during.get('busiest', [])[:2] if b['cores']
  )
  return (
      f' (others {during["others_cores"]:.2f} + steal {during["steal_cores"]:.2f} cores over '
      f'{during["seconds"]:.0f} s' + (f'; busiest: {top}' if top else '') + ')'
  )


# ------------------------------------------------------------------------------- the suite


def _invalid(res: Dict[str, List[Any]]) -> bool:
  return any(
      isinstance(r, dict) and (r.get('load') or {}).get('valid') is False
      for results in res.values()
      for r in results
  )


def _run_checked(
    specs, jobs, reps, log_dir, log, env, cpus, max_interference, retries, wait_quiet_s
) -> Dict[str, List[Any]]:
  """`run_group`, repeated (up to `retries` times) while the load guard finds it invalid."""
  for attempt in range(retries + 1):
    res = run_group(
        specs, jobs, reps, log_dir, log, env, cpus=cpus, max_interference=max_interference
    )
    if not _invalid(res) or attempt == retries:
      return res
    log(f'  too much other load during the timed repetitions; running again ({attempt + 1})')
    load_guard.wait_for_quiet(max_interference, wait_quiet_s, log)
  return res


def _py() -> List[str]:
  return [sys.executable, '-m']


def _worker_argv(
    framework: str, jobs: Sequence[tuple], shapes: str, workdir: str, **kw
) -> List[str]:
  argv = _py() + [f'benchmarks.bench_{framework}', '--shapes', shapes, '--workdir', workdir]
  for section, p in jobs:
    argv += ['--job', f'{section}:{p}']
  for k, v in kw.items():
    if v is None or v is False:
      continue
    flag = '--' + k.replace('_', '-')
    argv += [flag] if v is True else [flag, str(v)]
  return argv


# PyTorch's OpenMP threads spin while they wait; with other processes on the cores (a shared
# machine) that made PEFT's steps 2.5-5x slower in this project's measurements. Passive waiting
# is the standard setting for an oversubscribed machine (see ANALYSIS.md).
TORCH_ENV = {'OMP_WAIT_POLICY': 'PASSIVE'}


def run_suite(
    shapes: common.Shapes,
    workdir: str,
    dtype: str,
    log_dir: str,
    one_process: bool = False,
    cpu_only: bool = True,
    pinned: Sequence[str] = (),
    log=print,
    max_interference: float = load_guard.DEFAULT_MAX_INTERFERENCE,
    retries: int = 0,
    wait_quiet_s: float = 0.0,
) -> Dict[str, Any]:
  """Prepare + training, serving and decoding comparisons for one size. Returns raw results.

  A comparison whose timed repetitions shared the machine with more than `max_interference`
  cores of other work (`load_guard`) is run again, up to `retries` times, after waiting up to
  `wait_quiet_s` seconds for the machine to be quiet; the last attempt is kept either way (its
  verdict is in its `load` record).

  With `one_process` each framework runs all its jobs in one process (quick mode: saves the
  start-up and import time; peak memory is then shared by the jobs). With `cpu_only` the
  workers see no accelerator (JAX_PLATFORMS=cpu, CUDA_VISIBLE_DEVICES=''). The sections named
  in `pinned` are compared once more (longest prompt) with both workers on one core and one
  thread each: per-core efficiency, without thread synchronisation under contention.
  """
  env = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''} if cpu_only else None
  os.makedirs(workdir, exist_ok=True)
  results: Dict[str, Any] = {'shapes': shapes.name, 'dtype': dtype}
  log(f'[{shapes.name}] building the random transformers T5 checkpoint')
  label = f'{shapes.name}_prepare'
  prep = run_group(
      [(label, _worker_argv('peft', [('prepare', 0)], shapes.name, workdir))],
      [('prepare', 0)],
      {},
      log_dir,
      log,
      env={'CUDA_VISIBLE_DEVICES': ''},
  )
  results['prepare'] = prep[label][0]
  if 'error' in results['prepare']:
    return results
  cache = os.path.join(workdir, 'jax_cache')
  reps = {'train': shapes.train_reps, 'serve': shapes.serve_reps, 'decode': shapes.decode_reps}
  jobs = (
      [('train', p) for p in shapes.prompt_lengths]
      + [('serve', p) for p in shapes.serve_prompt_lengths]
      + [('decode', p) for p in shapes.decode_prompt_lengths]
  )
  for section, _ in jobs:
    results.setdefault(section, {})
  groups = [jobs] if one_process else [[job] for job in jobs]
  for group in groups:
    tag = '_'.join(f'{s}{p}' for s, p in group) if len(group) < 3 else 'all'
    specs = [
        (
            f'{shapes.name}_ours_{tag}',
            _worker_argv('ours', group, shapes.name, workdir, dtype=dtype, compilation_cache=cache),
        ),
        (
            f'{shapes.name}_peft_{tag}',
            _worker_argv('peft', group, shapes.name, workdir, dtype=dtype),
            TORCH_ENV,
        ),
    ]
    log(f'[{shapes.name}] ' + ', '.join(f'{s} P={p}' for s, p in group))
    res = _run_checked(
        specs, group, reps, log_dir, log, env, None, max_interference, retries, wait_quiet_s
    )
    for j, (section, p) in enumerate(group):
      results[section][p] = {'ours': res[specs[0][0]][j], 'peft': res[specs[1][0]][j]}
  if pinned and hasattr(os, 'sched_setaffinity'):
    core = sorted(os.sched_getaffinity(0))[-1]
    one_thread = dict(
        env or {},
        XLA_FLAGS=(
            os.environ.get('XLA_FLAGS', '')
            + (' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')
        ).strip(),
        OMP_NUM_THREADS='1',
    )
    pjobs = [
        (section, max(lengths))
        for section, lengths in (
            ('train', shapes.prompt_lengths),
            ('serve', shapes.serve_prompt_lengths),
            ('decode', shapes.decode_prompt_lengths),
        )
        if section in pinned
    ]
    specs = [
        (
            f'{shapes.name}_ours_pinned',
            _worker_argv(
                'ours',
                pjobs,
                shapes.name,
                workdir,
                dtype=dtype,
                compilation_cache=cache + '_pinned',
            ),
        ),
        (
            f'{shapes.name}_peft_pinned',
            _worker_argv('peft', pjobs, shapes.name, workdir, dtype=dtype, threads=1),
            TORCH_ENV,
        ),
    ]
    log(
        f'[{shapes.name}] '
        + ', '.join(f'{s} P={p}' for s, p in pjobs)
        + f', both pinned to core {core} with one thread'
    )
    res = _run_checked(
        specs,
        pjobs,
        reps,
        log_dir,
        log,
        one_thread,
        [core],
        max_interference,
        retries,
        wait_quiet_s,
    )
    for j, (section, p) in enumerate(pjobs):
      results.setdefault(f'pinned_{section}', {})[p] = {
          'ours': res[specs[0][0]][j],
          'peft': res[specs[1][0]][j],
          'core': core,
      }
  return results


def _prepare(shapes: common.Shapes, workdir: str, log_dir: str, log) -> Dict[str, Any]:
  """Builds the random transformers checkpoint both frameworks load (the `prepare` job)."""
  os.makedirs(workdir, exist_ok=True)
  label = f'{shapes.name}_prepare'
  prep = run_group(
      [(label, _worker_argv('peft', [('prepare', 0)], shapes.name, workdir))],
      [('prepare', 0)],
      {},
      log_dir,
      log,
      env={'CUDA_VISIBLE_DEVICES': ''},
  )
  return prep[label][0]


CPU_ENV = {'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': ''}


def run_realistic(
    shapes: common.Shapes, workdir: str, log_dir: str, one_process: bool = False, log=print
) -> Dict[str, Any]:
  """Training on the SST-2 / RTE / BoolQ input-length distributions (issue 18): ours with fixed
  padding and with length buckets, PEFT with pad-to-longest and with `group_by_length` batches."""
  results: Dict[str, Any] = {'kind': 'realistic', 'shapes': shapes.name}
  results['prepare'] = _prepare(shapes, workdir, log_dir, log)
  if 'error' in results['prepare']:
    return results
  p = shapes.realistic_prompt
  jobs = [(f'realistic_{d}', p) for d in common.DISTRIBUTIONS]
  groups = [jobs] if one_process else [[job] for job in jobs]
  cache = os.path.join(workdir, 'jax_cache')
  reps = {section: shapes.realistic_reps for section, _ in jobs}
  for group in groups:
    tag = '_'.join(s.split('_', 1)[1] for s, _ in group) if len(group) < 3 else 'all'
    specs = [
        (
            f'{shapes.name}_ours_realistic_{tag}',
            _worker_argv('ours', group, shapes.name, workdir, compilation_cache=cache),
        ),
        (
            f'{shapes.name}_peft_realistic_{tag}',
            _worker_argv('peft', group, shapes.name, workdir),
            TORCH_ENV,
        ),
    ]
    log(f'[{shapes.name}] realistic lengths: ' + ', '.join(s for s, _ in group))
    res = run_group(specs, group, reps, log_dir, log, CPU_ENV)
    for j, (section, _) in enumerate(group):
      results[section.split('_', 1)[1]] = {
          'ours': res[specs[0][0]][j],
          'peft': res[specs[1][0]][j],
      }
  return results


# XLA flags tried for bfloat16 (the dots table measures each; see ANALYSIS.md).
XLA_BF16_FLAGS = {
    'default': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'onednn_dot_fusion': '--xla_cpu_experimental_onednn_fusion_type=dot',
    'xnn_dot_fusion': '--xla_cpu_experimental_xnn_fusion_type=dot',
}


def run_bf16(shapes: common.Shapes, workdir: str, log_dir: str, log=print) -> Dict[str, Any]:
  """bfloat16 on the CPU: matmul microbenchmark (XLA flags, torch) and the training step of
  section 1 (longest prompt) in float32 and bfloat16 for both frameworks."""
  results: Dict[str, Any] = {'kind': 'bf16', 'shapes': shapes.name}
  results['prepare'] = _prepare(shapes, workdir, log_dir, log)
  if 'error' in results['prepare']:
    return results
  xla = os.environ.get('XLA_FLAGS', '')
  dots_specs = [
      (
          f'{shapes.name}_ours_dots_{name}',
          _worker_argv('ours', [('dots', 0)], shapes.name, workdir),
          {'XLA_FLAGS': f'{xla} {flags}'.strip()} if flags else {},
      )
      for name, flags in XLA_BF16_FLAGS.items()
  ] + [
      (
          f'{shapes.name}_peft_dots',
          _worker_argv('peft', [('dots', 0)], shapes.name, workdir),
          TORCH_ENV,
      )
  ]
  log(f'[{shapes.name}] bfloat16: matmul microbenchmark')
  res = run_group(dots_specs, [('dots', 0)], {'dots': shapes.dots_reps}, log_dir, log, CPU_ENV)
  results['dots'] = {
      spec[0].rsplit('_dots', 1)[1].lstrip('_') or 'peft': res[spec[0]][0] for spec in dots_specs
  }
  p = max(shapes.prompt_lengths)
  cache = os.path.join(workdir, 'jax_cache_bf16')
  variants = [
      ('ours_float32', 'ours', dict(dtype='float32', compilation_cache=cache), {}),
      (
          'ours_bfloat16_plain_dots',
          'ours',
          dict(dtype='bfloat16', dots='plain', compilation_cache=cache),
          {},
      ),
      ('ours_bfloat16', 'ours', dict(dtype='bfloat16', compilation_cache=cache), {}),
      ('peft_float32', 'peft', dict(dtype='float32'), TORCH_ENV),
      ('peft_bfloat16', 'peft', dict(dtype='bfloat16'), TORCH_ENV),
  ]
  specs = [
      (f'{shapes.name}_{name}', _worker_argv(fw, [('train', p)], shapes.name, workdir, **kw), env)
      for name, fw, kw, env in variants
  ]
  log(f'[{shapes.name}] bfloat16: training P={p}, float32 and bfloat16')
  res = run_group(specs, [('train', p)], {'train': shapes.train_reps}, log_dir, log, CPU_ENV)
  results['train'] = {name: res[f'{shapes.name}_{name}'][0] for name, _, _, _ in variants}
  results['prompt_length'] = p
  return results


# --------------------------------------------------------------------------------- report


def _med(xs):
  return common.median(xs) if xs else float('nan')


def _fmt(x, digits=2):
  if x is None:
    return 'n/a'
  try:
    if x != x:  # NaN
      return 'n/a'
  except TypeError:
    return str(x)
  if abs(x) >= 100:
    return f'{x:,.0f}'
  if 0 < abs(x) < 1:
    return f'{x:.{max(digits, 2)}g}'
  return f'{x:.{digits}f}'


def _ratio(a, b):
  try:
    return a / b
  except (TypeError, ZeroDivisionError):
    return float('nan')


def _pair_ratio(a: Sequence[float], b: Sequence[float]) -> float:
  """Median over repetitions r of a[r] / b[r] (throughputs measured next to each other in time)."""
  pairs = [x / y for x, y in zip(a or [], b or []) if x and y]
  return common.median(pairs) if pairs else float('nan')


def _paired(ours: Sequence[float], peft: Sequence[float]) -> str:
  """Range of the ratios of repetition pairs, and the ratio of the best repetitions."""
  pairs = [o / p for o, p in zip(ours or [], peft or []) if o and p]
  if not pairs:
    return 'n/a'
  best = max(ours) / max(peft)
  return f'pairs {min(pairs):.2f}-{max(pairs):.2f}; best/best {best:.2f}'


def _xla_mem(mem) -> str:
  if not mem:
    return ''
  return (
      f' (XLA buffers of the step: arguments {_fmt(mem["argument"])} MiB, of which donated '
      f'{_fmt(mem["alias"])}, temporaries {_fmt(mem["temp"])} MiB)'
  )


def _memory_map(mem) -> str:
  """`memory_map_mb` of a worker: its RSS by mapping, and what tcmalloc holds where it runs."""
  if not mem or not mem.get('by_mapping'):
    return 'n/a'
  text = f'{_fmt(mem["rss"])}: ' + ', '.join(
      f'`{k}` {_fmt(v)}' for k, v in list(mem['by_mapping'].items())[:4]
  )
  tc = mem.get('tcmalloc')
  if tc:
    small = sum(
        tc.get(k, 0.0) for k in ('central_cache_free', 'transfer_cache_free', 'thread_cache_free')
    )
    text += (
        f' (tcmalloc: {_fmt(tc.get("in_use"))} in use, {_fmt(tc.get("page_heap_free"))} in free '
        f'pages kept, {_fmt(small)} in small-object free lists)'
    )
  return text


def _ok(value, target, higher=True):
  if value is None or value != value:
    return 'n/a'
  return 'met' if (value >= target if higher else value <= target) else '**missed**'


def _err(res) -> Optional[str]:
  if res is None:
    return 'not run'
  if 'error' in res:
    return 'failed: ' + res['error'].strip().splitlines()[-1][:200]
  return None


def _machine() -> Dict[str, Any]:
  info = {
      'platform': platform.platform(),
      'python': platform.python_version(),
      'cores': os.cpu_count(),
  }
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and 'cpu' not in info:
          info['cpu'] = line.split(':', 1)[1].strip()
        if line.startswith('flags'):
          flags = line.split(':', 1)[1].split()
          # The matmul-relevant ISA extensions (bfloat16: avx512_bf16, amx_bf16).
          info['cpu_flags'] = sorted(
              f for f in flags if f.startswith(('avx512', 'amx', 'avx_vnni', 'fma'))
          )
          break
    with open('/proc/meminfo') as f:
      info['memory_gib'] = round(int(f.readline().split()[1]) / 2**20, 1)
  except OSError:
    pass
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  versions = {}
  for pkg in ('jax', 'jaxlib', 'flax', 'torch', 'transformers', 'peft', 'numpy'):
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = 'not installed'
  info['versions'] = versions
  return info


def train_rows(results) -> List[Dict[str, Any]]:
  rows = []
  for p, r in results.get('train', {}).items():
    o, q = r['ours'], r['peft']
    row = {'P': p, 'error': _err(o) or (_err(q) if q is not None else None)}
    if _err(o) is None:
      row.update(
          {
              'ours_ex_s': _med(o['examples_per_s']),
              'flops_step': o['flops_per_step'],
              'achieved': o['achieved_flops_per_s'],
              'matmul': o['matmul_flops_per_s'],
              'util': o['utilisation'],
              'ours_rss': o['peak_rss_mb'],
              'ours_loss': o['first_loss'],
              'ours_first_step_s': o['first_step_s'],
              'ours_second_step_s': o.get('second_step_s'),
              'cache': o.get('jit_cache_entries', {}),
              'ours_rss_phases': o.get('rss_mb', {}),
              'ours_tf_imported': o.get('tensorflow_imported'),
              'ours_ex_all': o['examples_per_s'],
              'xla_mem': o.get('xla_memory_mb'),
              'ours_memory_map': o.get('memory_map_mb'),
          }
      )
    if q is not None and _err(q) is None:
      row.update(
          {
              'peft_ex_s': _med(q['examples_per_s']),
              'peft_rss': q['peak_rss_mb'],
              'peft_loss': q['first_loss'],
              'peft_matmul': q['matmul_flops_per_s'],
              'peft_ex_all': q['examples_per_s'],
              'peft_rss_phases': q.get('rss_mb', {}),
              'peft_memory_map': q.get('memory_map_mb'),
          }
      )
    row['speedup'] = _pair_ratio(row.get('ours_ex_all'), row.get('peft_ex_all'))
    shapes = common.SHAPES[results['shapes']]
    if 'flops_step' in row:
      row['util'] = _rep_util(row['flops_step'], o['step_times_s'], o['matmul']['times_s'], shapes)
    if 'peft_ex_s' in row and 'flops_step' in row:
      row['peft_achieved'] = row['flops_step'] * row['peft_ex_s'] / shapes.batch
      row['peft_util'] = _rep_util(
          row['flops_step'], q['step_times_s'], q['matmul']['times_s'], shapes
      )
    rows.append(row)
  return rows


def _rep_util(
    flops: float, step_times: Sequence[float], matmul_times: Sequence[float], shapes: common.Shapes
) -> float:
  """Median over repetitions of (FLOP/s of the step) / (FLOP/s of the matmul timed right after).

  The worker times `matmul_reps` matmuls after every repetition, so a repetition's utilisation
  compares two measurements taken under the same load.
  """
  k = shapes.matmul_reps
  chunks = [matmul_times[i * k : (i + 1) * k] for i in range(len(step_times))]
  utils = [
      flops / t / (common.matmul_flops(shapes.matmul_size) / common.median(c))
      for t, c in zip(step_times, chunks)
      if c
  ]
  return common.median(utils) if utils else float('nan')


def shapes_batch(results) -> int:
  return common.SHAPES[results['shapes']].batch


def serve_rows(results) -> List[Dict[str, Any]]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = []
  for p, r in results.get('serve', {}).items():
    o, q = r['ours'], r['peft']
    row = {'P': p, 'error': _err(o) or (_err(q) if q is not None else None)}
    if _err(o) is None:
      row.update(
          {
              'mixed': _med(o['mixed_examples_per_s']),
              'single': _med(o['single_examples_per_s']),
              'mixed_all': o['mixed_examples_per_s'],
              'single_all': o['single_examples_per_s'],
              'ours_rss': o['peak_rss_mb'],
          }
      )
      row['mixed_vs_single'] = _pair_ratio(row['mixed_all'], row['single_all'])
      if o.get('mixed_generate_examples_per_s'):
        row['gen_all'] = o['mixed_generate_examples_per_s']
        row['gen'] = _med(row['gen_all'])
    if q is not None and _err(q) is None:
      row.update(
          {
              'peft_per_task': _med(q['per_task_examples_per_s']),
              'peft_single': _med(q['single_examples_per_s']),
              'peft_per_task_all': q['per_task_examples_per_s'],
              'peft_rss': q['peak_rss_mb'],
          }
      )
      row['mixed_vs_peft'] = _pair_ratio(row.get('mixed_all'), row['peft_per_task_all'])
      if _err(o) is None:
        a, b = np.asarray(o['mixed_scores']), np.asarray(q['per_task_scores'])
        row['score_diff'] = float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))
      if q.get('per_task_generate_examples_per_s'):
        row['peft_gen_all'] = q['per_task_generate_examples_per_s']
        row['peft_gen'] = _med(row['peft_gen_all'])
        row['gen_vs_peft'] = _pair_ratio(row.get('gen_all'), row['peft_gen_all'])
        if _err(o) is None and o.get('mixed_generate_tokens') is not None:
          a, b = np.asarray(o['mixed_generate_tokens']), np.asarray(q['per_task_generate_tokens'])
          if a.shape == b.shape:
            row['gen_agree'] = float(np.mean(a == b))
    rows.append(row)
  return rows


def decode_rows(results) -> List[Dict[str, Any]]:
  import numpy as np  # pylint: disable=g-import-not-at-top

  rows = []
  for p, r in results.get('decode', {}).items():
    o, q = r['ours'], r['peft']
    row = {'P': p, 'error': _err(o) or (_err(q) if q is not None else None)}
    if _err(o) is None:
      row.update(
          {
              'ours_tok_s': _med(o['tokens_per_s']),
              'ours_all': o['tokens_per_s'],
              'batch': o['batch'],
              'new_tokens': o['new_tokens'],
              'ours_first_s': o['first_call_s'],
          }
      )
    if q is not None and _err(q) is None:
      row.update({'hf_tok_s': _med(q['tokens_per_s']), 'hf_all': q['tokens_per_s']})
      row['speedup'] = _pair_ratio(row.get('ours_all'), row['hf_all'])
      if _err(o) is None:
        a, b = np.asarray(o['tokens']), np.asarray(q['tokens'])
        if a.shape == b.shape:
          row['agree'] = float(np.mean(a == b))
    rows.append(row)
  return rows


def render(all_results: Dict[str, Any], meta: Dict[str, Any]) -> str:
  lines: List[str] = []
  add = lines.append
  m = meta['machine']
  add('# Benchmarks: prompt_tuning (JAX/Flax) vs Hugging Face PEFT (PyTorch)')
  add('')
  records = list(_load_records(all_results))
  invalid = [r for r in records if r[3].get('valid') is False]
  if invalid:
    add(
        f'**INVALID RUN: {len(invalid)} of {len(records)} comparisons were timed while other work '
        f'kept more than {meta.get("max_interference", load_guard.DEFAULT_MAX_INTERFERENCE):.2f} '
        'cores of this machine busy** ('
        + ', '.join(f'{sec} P={p}' for _, sec, p, _ in invalid)
        + '; see "Run validity"). Background load slows PyTorch more than XLA, so these ratios '
        'flatter ours and are not evidence. Re-run `python -m benchmarks.run` on a quiet machine.'
    )
    add('')
  add(
      f'Generated by `{meta["command"]}` on {meta["date"]} in {meta["wall_min"]:.1f} minutes'
      + (
          ' (**quick mode: tiny shapes, one repetition; not a measurement**)'
          if meta['quick']
          else ''
      )
      + '.'
      + (' ' + meta['note_main'] if meta.get('note_main') else '')
  )
  add('')
  add(
      f'- Machine: {m.get("cpu", "?")}, {m.get("cores")} cores, {m.get("memory_gib", "?")} GiB, '
      f'{m["platform"]}, Python {m["python"]}; JAX default backend `{meta["backend"]}` (the CPU '
      'sections run with `JAX_PLATFORMS=cpu`).'
  )
  cpu = meta.get('cpu_info') or {}
  if cpu:
    add(
        f'- CPU: {cpu.get("model", "?")} ({cpu.get("vendor", "?")}, {cpu.get("logical_cpus")} '
        f'logical CPUs{", virtual machine" if cpu.get("hypervisor") else ""}); matmul-relevant '
        f'ISA: {", ".join(cpu.get("isa", [])) or "none of " + ", ".join(load_guard.ISA_FLAGS)}.'
    )
  if m.get('cpu_flags') is not None:
    add(
        '- CPU matmul extensions (`/proc/cpuinfo` flags): '
        + (', '.join(f'`{f}`' for f in m['cpu_flags']) or 'none of AVX-512/AMX')
        + '.'
    )
  add('- Versions: ' + ', '.join(f'{k} {v}' for k, v in m['versions'].items()) + '.')
  add(
      f'- Load average (1/5/15 min) at start {meta["load_start"]}, at end {meta["load_end"]}. '
      'Other processes shared this machine, so absolute numbers are noisy; compare the ratios '
      "(both frameworks' repetitions are interleaved in time)."
  )
  add(
      '- Method: one worker process per framework and section; both set up, then their timed '
      'repetitions alternate (ours, PEFT, PEFT, ours, ...) and never overlap. Throughputs are '
      'medians over repetitions. A ratio is the median over repetitions of the ratio of the two '
      'measurements taken next to each other in time, which cancels most of the load that other '
      'jobs put on the machine; in parentheses, the range of those pair ratios ("pairs") and the '
      'ratio of the fastest repetitions ("best/best"). XLA '
      'uses all cores; `torch.set_num_threads(cores)`; PEFT workers run with '
      f'{", ".join(f"`{k}={v}`" for k, v in meta.get("torch_env", {}).items()) or "the default OpenMP settings"}.'
  )
  allocators = _allocators(all_results)
  if allocators:
    add(
        f"- Allocator: ours' workers ran with {allocators.get('ours', 'not recorded')} (set as the "
        "entry points set it: `launch.tune_malloc`, `PROMPT_TUNING_MALLOC`), PEFT's with "
        f"{allocators.get('peft', 'not recorded')}."
    )
  lines += _gin_lines(all_results)
  lines += _train_step_lines(all_results)
  lines += _validity_lines(all_results, meta)
  for key, res in all_results.items():
    kind = res.get('kind') if isinstance(res, dict) else None
    if kind == 'realistic':
      lines += _render_realistic(key, res)
    elif kind == 'bf16':
      lines += _render_bf16(key, res)
    else:
      lines += _render_suite(key, res, meta)
  for part in ('realistic', 'bf16'):
    if meta.get(f'load_{part}_start') is not None:
      add('')
      add(
          f'Load average during the {part} section: {meta[f"load_{part}_start"]} at its start, '
          f'{meta.get(f"load_{part}_end")} at its end.'
      )
    if meta.get(f'note_{part}'):  # A section merged in from a separate run says so.
      add('')
      add(meta[f'note_{part}'])
  if meta.get('gpu_note'):
    add('')
    add('## GPU section')
    add('')
    add(meta['gpu_note'])
  if meta.get('analysis'):
    add('')
    add(meta['analysis'].rstrip())
  add('')
  return '\n'.join(lines)


def _load_records(all_results: Dict[str, Any]):
  """`(suite, section, P, load record)` of every comparison that carries one."""
  for suite, res in all_results.items():
    if not isinstance(res, dict):
      continue
    for section, by_p in res.items():
      if section == 'prepare' or not isinstance(by_p, dict):
        continue
      for p, r in by_p.items():
        if not isinstance(r, dict):
          continue
        for fw in ('ours', 'peft'):
          if isinstance(r.get(fw), dict) and 'load' in r[fw]:
            yield suite, section, p, r[fw]['load']
            break


def _validity_lines(all_results: Dict[str, Any], meta: Dict[str, Any]) -> List[str]:
  """The policy, and per comparison what else ran while it was timed (`load_guard`)."""
  tol = meta.get('max_interference', load_guard.DEFAULT_MAX_INTERFERENCE)
  records = list(_load_records(all_results))
  lines = [
      '',
      '## Run validity',
      '',
      'Background load does not slow both frameworks alike (PyTorch loses more to descheduled '
      'threads), so a loaded machine flatters ours. Every comparison below was bracketed: the '
      'load average and the busiest other processes before and after it, and, over its timed '
      "repetitions, the CPU time the rest of the machine used (all busy time minus this run's "
      'own processes, from `/proc`) plus the time the hypervisor stole. A comparison is valid when '
      f'that interference stayed at or below {tol:.2f} cores on average (on its one core for the '
      'pinned rows); otherwise it was re-run after waiting for quiet, and if still loaded it is '
      'marked INVALID here and at the top. The pinned one-core rows are the figures least '
      'sensitive to load.',
      '',
  ]
  start = meta.get('quiet_at_start') or {}
  if 'interference_cores' in start:
    lines.append(
        f'At the start other processes used {start["interference_cores"]:.2f} cores'
        + (' (started anyway: `--allow-load`)' if start.get('quiet') is False else '')
        + '.'
    )
    lines.append('')
  if not records:
    lines.append('No comparison carries a load record.')
    return lines
  lines.append(
      '| comparison | timed for | other processes (cores) | steal (cores) | load avg before -> '
      'after | busiest other processes while timed | verdict |'
  )
  lines.append('|---|---|---|---|---|---|---|')
  for suite, section, p, rec in records:
    during = rec.get('during') or {}
    before = (rec.get('before') or {}).get('load_avg')
    after = (rec.get('after') or {}).get('load_avg')
    loads = f'{before[0] if before else "?"} -> {after[0] if after else "?"}'
    busiest = '; '.join(
        f'`{b["command"][:60]}` {b["cores"]:.2f}' for b in during.get('busiest', [])[:3]
    )
    verdict = rec.get('verdict', '?')
    if rec.get('valid') is False:
      verdict = f'**{verdict}**'
    pinned = (
        f' (core {",".join(map(str, during["cpus"]))})'
        if isinstance(during.get('cpus'), list)
        else ''
    )
    lines.append(
        f'| {suite}: {section} P={p}{pinned} | {during.get("seconds", "n/a")} s | '
        f'{during.get("others_cores", "n/a")} | {during.get("steal_cores", "n/a")} | {loads} | '
        f'{busiest or "none"} | {verdict} |'
    )
  return lines


def _allocators(all_results: Dict[str, Any]) -> Dict[str, str]:
  """Per framework, the allocator settings its workers ran with (older results: none recorded)."""
  tunables = _worker_values(all_results, 'glibc_tunables')
  preloads = _worker_values(all_results, 'ld_preload')
  said = {}
  for framework, values in tunables.items():
    preload = [v for v in preloads.get(framework, []) if v]
    if preload:  # a preloaded allocator replaces glibc's
      settings = [common.describe_allocator(ld_preload=v) for v in preload]
    else:
      settings = [common.describe_allocator(glibc_tunables=v) for v in values]
    said[framework] = ', '.join(settings)
  return said


def _gin_lines(all_results: Dict[str, Any]) -> List[str]:
  """The report's line on the gin bindings ours' workers ran with (`--ours-gin`), if any."""
  found = [b for v in _worker_values(all_results, 'gin_bindings').get('ours', []) for b in v]
  if not found:
    return []
  said = ', '.join(f'`{b}`' for b in dict.fromkeys(found))
  return [f"- Gin bindings of ours' workers (`--ours-gin`): {said}."]


def _train_step_lines(all_results: Dict[str, Any]) -> List[str]:
  """The report's line on how ours' training step was compiled (`trainer.SplitTrainStep` or not)."""
  counts = _worker_values(all_results, 'executables_per_step').get('ours', [])
  if not counts:
    return []
  names = {
      1: 'one executable',
      2: 'split in two executables (`trainer.SplitTrainStep`: forward'
      " on XLA's Eigen dots, backward and update on YNNPACK's)",
  }
  said = ' and '.join(names.get(n, f'{n} executables') for n in counts)
  return [f"- Ours' training step: {said}."]


def _worker_values(all_results: Dict[str, Any], field: str) -> Dict[str, List[str]]:
  """The distinct values of a worker meta `field`, per framework, over every measurement."""
  found: Dict[str, List[str]] = {}

  def visit(node):
    if not isinstance(node, dict):
      return
    if field in node and node.get('framework') in ('ours', 'peft'):
      values = found.setdefault(node['framework'], [])
      if node[field] not in values:
        values.append(node[field])
      return
    for child in node.values():
      visit(child)

  visit(all_results)
  return found


def _render_suite(key: str, res: Dict[str, Any], meta) -> List[str]:
  lines: List[str] = []
  add = lines.append
  shapes = common.SHAPES[res['shapes']]
  hf = shapes.hf_config
  dtype = res['dtype']
  add('')
  add(
      f'## {key}: d_model {hf["d_model"]}, {hf["num_layers"]}+{hf["num_decoder_layers"]} layers, '
      f'{hf["num_heads"]} heads of {hf["d_kv"]}, d_ff {hf["d_ff"]} (gated GELU), vocab '
      f'{hf["vocab_size"]}, {dtype}'
  )
  add('')
  if _err(res.get('prepare')):
    add(f'Preparing the checkpoint {_err(res["prepare"])}.')
    return lines
  add(
      f'Random `T5ForConditionalGeneration` (seed {common.SEED}, untied head) saved with '
      '`save_pretrained` and loaded into ours with `prompt_tuning.checkpoints.huggingface.load_t5`; '
      'prompts U[-0.5, 0.5) from one seed in both. Dropout 0.'
  )
  add('')
  # Training.
  add(
      f'### 1. Training (batch {shapes.batch}, inputs {shapes.inputs}, targets {shapes.targets}; '
      f'{shapes.train_reps} repetitions of {shapes.train_steps} steps after 2 warm-up steps)'
  )
  add('')
  add(
      'Ours: `runtime.trainer.Trainer.train` on host (numpy) batches, state from '
      '`runtime.train_state.StateBuilder`, T5X `Adafactor` (decay_rate 0.8, no parameter scaling, '
      'clipping 1.0) on `.*/prompt/.*` through `MultiOptimizer`, gradient w.r.t. the prompt only, '
      'state donated. PEFT: `PromptTuningConfig(num_transformer_submodules=1)`, '
      '`transformers.optimization.Adafactor(lr=0.3, relative_step=False, scale_parameter=False)` '
      'on the prompt embedding, `loss.backward()`, `step()`. Same loss (mean token cross entropy).'
  )
  add('')
  add(
      '| prompt | ours ex/s | PEFT ex/s | speedup | target >= 1.2x | peak RSS ours / PEFT (MiB) '
      '| target ours <= PEFT | first-step loss ours / PEFT |'
  )
  add('|---|---|---|---|---|---|---|---|')
  for r in train_rows(res):
    if r.get('error') and 'ours_ex_s' not in r:
      add(f'| {r["P"]} | {r["error"]} |' + ' |' * 6)
      continue
    add(
        f'| {r["P"]} | {_fmt(r.get("ours_ex_s"))} | {_fmt(r.get("peft_ex_s"))} | '
        f'{_fmt(r["speedup"])}x ({_paired(r.get("ours_ex_all", []), r.get("peft_ex_all", []))}) | '
        f'{_ok(r["speedup"], 1.2)} | {_fmt(r["ours_rss"])} / {_fmt(r.get("peft_rss"))} | '
        f'{_ok(r["ours_rss"], r.get("peft_rss", float("nan")), higher=False)} | '
        f'{_fmt(r["ours_loss"], 4)} / {_fmt(r.get("peft_loss"), 4)} |'
    )
  add('')
  add(
      "Utilisation: FLOPs of one step from XLA's `compiled.cost_analysis()` (the same computation "
      'in both frameworks: forward, and backward to the prompt without weight gradients) over the '
      'step time, relative to the FLOP/s of the matmuls timed right after the same repetition, '
      'median over repetitions. The matmul is a '
      f'{shapes.matmul_size}x{shapes.matmul_size} {dtype} product timed {shapes.matmul_reps} times '
      'in the same process after every repetition (`jnp.dot` for ours, `torch.mm` for PEFT). '
      'GFLOP/s columns: FLOPs per step / median step time, and the median matmul.'
  )
  add('')
  add(
      '| prompt | GFLOP/step | ours GFLOP/s | `jnp.dot` GFLOP/s | ours utilisation | target >= 70% '
      '| PEFT GFLOP/s | `torch.mm` GFLOP/s | PEFT utilisation |'
  )
  add('|---|---|---|---|---|---|---|---|---|')
  for r in train_rows(res):
    if 'ours_ex_s' not in r:
      continue
    add(
        f'| {r["P"]} | {_fmt(r["flops_step"] / 1e9, 1)} | {_fmt(r["achieved"] / 1e9, 1)} | '
        f'{_fmt(r["matmul"] / 1e9, 1)} | {100 * r["util"]:.0f}% | {_ok(r["util"], 0.7)} | '
        f'{_fmt(r.get("peft_achieved", float("nan")) / 1e9, 1)} | '
        f'{_fmt(r.get("peft_matmul", float("nan")) / 1e9, 1)} | '
        f'{_fmt(100 * r.get("peft_util", float("nan")), 0)}% |'
    )
  rows = [r for r in train_rows(res) if 'ours_ex_s' in r]
  if rows:
    add('')
    add(
        'Ours, details: '
        + '; '.join(
            f'P={r["P"]}: first step (trace + compile) {_fmt(r["ours_first_step_s"], 1)} s, second '
            f'step {_fmt(r["ours_second_step_s"], 1)} s, jit cache entries of the train step '
            f'{r["cache"].get("after_step_1")} after step 1 / {r["cache"].get("after_step_2")} after '
            f'step 2 / {r["cache"].get("after_timing")} after the timed steps; RSS MiB after imports '
            f'{_fmt(r["ours_rss_phases"].get("imports"))}, loaded '
            f'{_fmt(r["ours_rss_phases"].get("loaded"))}, state built '
            f'{_fmt(r["ours_rss_phases"].get("state"))}, compiled '
            f'{_fmt(r["ours_rss_phases"].get("compiled"))}' + _xla_mem(r.get('xla_mem'))
            for r in rows
        )
        + '.'
    )
    if any(r.get('ours_memory_map') or r.get('peft_memory_map') for r in rows):
      add(
          'Resident memory between two steps, after the timed ones (MiB, `/proc/self/smaps` by '
          'mapping, largest first): '
          + '; '.join(
              f'P={r["P"]}: ours {_memory_map(r.get("ours_memory_map"))}, PEFT '
              f'{_memory_map(r.get("peft_memory_map"))}'
              for r in rows
          )
          + '.'
      )
    imported = [r['P'] for r in rows if r.get('ours_tf_imported')]
    add(
        "The training worker imports the runtime's train modules (`train_state`, `trainer`, "
        '`models`, `partitioning`, `adafactor`, `optimizers`) but not `seqio` or TensorFlow (they '
        'are imported where data is read): TensorFlow was '
        + (f'**imported** (P={imported})' if imported else 'not imported')
        + ' in the worker.'
    )
    add(
        'PEFT, details: '
        + '; '.join(
            f'P={r["P"]}: RSS MiB after imports {_fmt(r.get("peft_rss_phases", {}).get("imports"))}, '
            f'loaded {_fmt(r.get("peft_rss_phases", {}).get("loaded"))}'
            for r in rows
        )
        + '.'
    )
  pinned = res.get('pinned_train') or res.get('pinned') or {}
  for p, pr in pinned.items():
    rows_p = train_rows({'shapes': res['shapes'], 'train': {p: pr}})
    add('')
    add(
        f'Training again with both workers pinned to one core (core {pr.get("core")}) and one '
        'thread each (XLA single-threaded, `torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`): '
        'per-core efficiency, free of thread synchronisation under contention.'
    )
    add('')
    add(
        '| prompt | ours ex/s | PEFT ex/s | speedup | ours utilisation (`jnp.dot`) '
        '| PEFT utilisation (`torch.mm`) |'
    )
    add('|---|---|---|---|---|---|')
    for r in rows_p:
      if 'ours_ex_s' not in r or 'peft_ex_s' not in r:
        add(f'| {r["P"]} | {r.get("error") or "failed"} | | | | |')
        continue
      add(
          f'| {r["P"]} | {_fmt(r["ours_ex_s"])} | {_fmt(r["peft_ex_s"])} | '
          f'{_fmt(r["speedup"])}x ({_paired(r["ours_ex_all"], r["peft_ex_all"])}) | '
          f'{100 * r["util"]:.0f}% | {100 * r["peft_util"]:.0f}% |'
      )
  # Serving.
  add('')
  add(
      f'### 2. Mixed-task serving ({shapes.serve_batch} examples from {shapes.serve_tasks} tasks, '
      f'inputs {shapes.inputs}, targets {shapes.targets}; teacher-forced scoring; '
      f'{shapes.serve_reps} repetitions)'
  )
  add('')
  add(
      'Work per call: encoder + decoder forward producing the logits, log-softmax and the '
      'per-example target log-likelihood. Ours: `EncoderDecoderModel.score_batch` jitted through '
      '`PjitPartitioner.partition` (as `runtime/inference.py`), host batch; mixed = '
      f'`PromptEncoderDecoder(num_prompts={shapes.serve_tasks})` (`PromptBank`) with `prompt_ids`, '
      'single = one prompt for the whole batch. PEFT cannot mix prompt adapters in a batch: '
      f'{shapes.serve_tasks} adapters loaded, one forward per task after `set_adapter` '
      f'({shapes.serve_batch // shapes.serve_tasks} examples each); "PEFT single" = one adapter, '
      'one forward of the whole batch (reference).'
  )
  add('')
  add(
      '| prompt | ours mixed ex/s | ours single ex/s | mixed / single | target >= 0.9 '
      '| PEFT per-task ex/s | mixed / PEFT per-task (pairs) | target >= 4x | PEFT single ex/s '
      '| max rel. score diff ours vs PEFT |'
  )
  add('|---|---|---|---|---|---|---|---|---|---|')
  for r in serve_rows(res):
    if r.get('error') and 'mixed' not in r:
      add(f'| {r["P"]} | {r["error"]} |' + ' |' * 8)
      continue
    add(
        f'| {r["P"]} | {_fmt(r["mixed"])} | {_fmt(r["single"])} | {_fmt(r["mixed_vs_single"])} '
        f'({_paired(r["mixed_all"], r["single_all"])}) | '
        f'{_ok(r["mixed_vs_single"], 0.9)} | {_fmt(r.get("peft_per_task"))} | '
        f'{_fmt(r.get("mixed_vs_peft"))}x ({_paired(r["mixed_all"], r.get("peft_per_task_all", []))}) | '
        f'{_ok(r.get("mixed_vs_peft"), 4.0)} | {_fmt(r.get("peft_single"))} | '
        f'{r.get("score_diff", float("nan")):.1e} |'
    )
  gen_rows = [r for r in serve_rows(res) if 'gen' in r]
  if gen_rows:
    add('')
    add(
        f'Serving by generation, the same {shapes.serve_batch} examples: greedy decoding of '
        f'exactly {shapes.targets} label tokens (KV cache, EOS suppressed). Ours: one '
        '`predict_batch_with_aux` call for the whole mixed-task batch (`prompt_ids`). PEFT: '
        f'`set_adapter` and one `generate` per task ({shapes.serve_tasks} calls). The 4x target '
        'above is stated for scoring; generation is the other common way to serve labels, and its '
        'decoding steps do little work per call, so per-call overhead weighs more.'
    )
    add('')
    add(
        '| prompt | ours mixed ex/s | PEFT per-task ex/s | ours / PEFT (pairs) | greedy tokens identical |'
    )
    add('|---|---|---|---|---|')
    for r in gen_rows:
      agree = r.get('gen_agree')
      add(
          f'| {r["P"]} | {_fmt(r["gen"])} | {_fmt(r.get("peft_gen"))} | '
          f'{_fmt(r.get("gen_vs_peft"))}x ({_paired(r["gen_all"], r.get("peft_gen_all", []))}) | '
          f'{"n/a" if agree is None else f"{100 * agree:.1f}%"} |'
      )
  for p, pr in (res.get('pinned_serve') or {}).items():
    rows_p = serve_rows({'serve': {p: pr}})
    add('')
    add(
        f'Serving again with both workers pinned to one core (core {pr.get("core")}), one thread '
        'each:'
    )
    add('')
    add(
        '| prompt | ours mixed ex/s | ours single ex/s | PEFT per-task ex/s | PEFT single ex/s '
        '| mixed / PEFT per-task | generation: ours mixed / PEFT per-task |'
    )
    add('|---|---|---|---|---|---|---|')
    for r in rows_p:
      if 'mixed' not in r or 'peft_per_task' not in r:
        add(f'| {r["P"]} | {r.get("error") or "failed"} | | | | | |')
        continue
      gen = (
          f'{_fmt(r["gen_vs_peft"])}x ({_paired(r["gen_all"], r["peft_gen_all"])})'
          if 'gen_vs_peft' in r
          else 'n/a'
      )
      add(
          f'| {r["P"]} | {_fmt(r["mixed"])} | {_fmt(r["single"])} | {_fmt(r["peft_per_task"])} | '
          f'{_fmt(r["peft_single"])} | {_fmt(r["mixed_vs_peft"])}x '
          f'({_paired(r["mixed_all"], r["peft_per_task_all"])}) | {gen} |'
      )
  # Decoding.
  add('')
  add(
      f'### 3. Greedy decoding ({shapes.decode_batch} examples, inputs {shapes.inputs}, exactly '
      f'{shapes.decode_tokens} new tokens, KV cache; {shapes.decode_reps} repetitions)'
  )
  add('')
  add(
      'Ours: `EncoderDecoderModel.predict_batch_with_aux` with `decoding.temperature_sample` '
      '(topk=1, EOS logit masked by `logit_callback_fn`), jitted, one call = encoder + cache init + '
      'the decode loop. Transformers: `PeftModelForSeq2SeqLM.generate` (greedy, `num_beams=1`, '
      '`use_cache=True`, `min_new_tokens = max_new_tokens`), same prompt and inputs.'
  )
  add('')
  add(
      '| prompt | ours tokens/s | transformers tokens/s | speedup (pairs) | target >= 1.0x '
      '| greedy tokens identical |'
  )
  add('|---|---|---|---|---|---|')
  for r in decode_rows(res):
    if r.get('error') and 'ours_tok_s' not in r:
      add(f'| {r["P"]} | {r["error"]} |' + ' |' * 4)
      continue
    agree = r.get('agree')
    add(
        f'| {r["P"]} | {_fmt(r["ours_tok_s"])} | {_fmt(r.get("hf_tok_s"))} | '
        f'{_fmt(r.get("speedup"))}x ({_paired(r["ours_all"], r.get("hf_all", []))}) | '
        f'{_ok(r.get("speedup"), 1.0)} | '
        f'{"n/a" if agree is None else f"{100 * agree:.1f}%"} |'
    )
  for p, pr in (res.get('pinned_decode') or {}).items():
    rows_p = decode_rows({'decode': {p: pr}})
    add('')
    add(
        f'Decoding again with both workers pinned to one core (core {pr.get("core")}), one thread '
        'each:'
    )
    add('')
    add('| prompt | ours tokens/s | transformers tokens/s | speedup |')
    add('|---|---|---|---|')
    for r in rows_p:
      if 'ours_tok_s' not in r or 'hf_tok_s' not in r:
        add(f'| {r["P"]} | {r.get("error") or "failed"} | | |')
        continue
      add(
          f'| {r["P"]} | {_fmt(r["ours_tok_s"])} | {_fmt(r["hf_tok_s"])} | '
          f'{_fmt(r["speedup"])}x ({_paired(r["ours_all"], r["hf_all"])}) |'
      )
  errors = [(k, v) for k, v in _all_workers(res) if _err(v)]
  if errors:
    add('')
    add('Failures: ' + '; '.join(f'{k}: {_err(v)}' for k, v in errors))
  cmds = [v.get('command') for _, v in _all_workers(res) if isinstance(v, dict)]
  if cmds:
    add('')
    add('<details><summary>Worker commands</summary>')
    add('')
    add('```')
    lines += sorted({c for c in cmds if c})
    add('```')
    add('</details>')
  return lines


def _commands(workers) -> List[str]:
  cmds = sorted({w.get('command') for w in workers if isinstance(w, dict) and w.get('command')})
  if not cmds:
    return []
  return ['', '<details><summary>Worker commands</summary>', '', '```', *cmds, '```', '</details>']


def _render_realistic(key: str, res: Dict[str, Any]) -> List[str]:
  lines: List[str] = []
  add = lines.append
  shapes = common.SHAPES[res['shapes']]
  hf = shapes.hf_config
  add('')
  add(
      f'## {key}: training on realistic input lengths (d_model {hf["d_model"]}, '
      f'{hf["num_layers"]}+{hf["num_decoder_layers"]} layers, vocab {hf["vocab_size"]}, float32, '
      f'batch {shapes.batch}, prompt {shapes.realistic_prompt})'
  )
  add('')
  if _err(res.get('prepare')):
    add(f'Preparing the checkpoint {_err(res["prepare"])}.')
    return lines
  add(
      f'Every variant batches the same stream of {shapes.realistic_stream} generated examples '
      "(random token ids) whose input lengths follow the task's distribution (below), targets "
      f"padded to {shapes.realistic_targets} where padding is fixed. Ours: the runtime's `Trainer`; "
      f'**fixed** = T5X without packing, every batch padded to {shapes.realistic_max_inputs} '
      "(the paper's recipe, the README's SST-2 command); **bucketed** = `runs/bucketing.gin`: "
      'batches within the buckets `BucketConfig()` chooses from the distribution (4 lengths, '
      'plus the full length as catch-all); **bucketed 8** = `NUM_BUCKETS = 8`. PEFT: '
      '**pad-to-longest** = consecutive batches padded to their longest example '
      "(`DataCollatorForSeq2Seq(padding=True)`); **group_by_length** = transformers' "
      '`get_length_grouped_indices` order (megabatches of 50 batches sorted by length), padded to '
      'the longest. A repetition times '
      f'{shapes.realistic_timed} batches of each variant ({shapes.realistic_timed_fixed} for fixed, '
      'whose batches all have one shape) picked evenly from its batches sorted by padded length, '
      "so their time estimates the whole stream's; examples/s = timed examples / time, medians "
      f'over {shapes.realistic_reps} repetitions, the variants interleaved. Padding = share of '
      'padded input positions over the whole stream (prompt excluded). Every bucket shape is '
      'compiled once in setup.'
  )
  add('')
  add(
      '| task | mean input tokens | ours fixed ex/s | ours bucketed ex/s | ours bucketed 8 ex/s '
      '| PEFT pad-to-longest ex/s | PEFT group_by_length ex/s | bucketed / PEFT longest '
      '| target >= 1.5x | bucketed / PEFT grouped | target >= 1.0x | bucketed / fixed |'
  )
  add('|---|---|---|---|---|---|---|---|---|---|---|---|')
  pad_rows = []
  workers = []
  for d, dist in common.DISTRIBUTIONS.items():
    r = res.get(d)
    if r is None:
      continue
    o, q = r['ours'], r['peft']
    workers += [o, q]
    err = _err(o) or _err(q)
    if err and (_err(o) and _err(q)):
      add(f'| {dist.name} | {err} |' + ' |' * 10)
      continue
    med = lambda w, k: _med(w.get(f'{k}_examples_per_s', [])) if not _err(w) else float('nan')
    allv = lambda w, k: w.get(f'{k}_examples_per_s', []) if not _err(w) else []
    b_long = _pair_ratio(allv(o, 'bucketed'), allv(q, 'longest'))
    b_grp = _pair_ratio(allv(o, 'bucketed'), allv(q, 'grouped'))
    b_fix = _pair_ratio(allv(o, 'bucketed'), allv(o, 'fixed'))
    mean_tokens = (o if not _err(o) else q).get('mean_input_tokens', float('nan'))
    add(
        f'| {dist.name} | {_fmt(mean_tokens, 1)} | {_fmt(med(o, "fixed"))} | '
        f'{_fmt(med(o, "bucketed"))} | {_fmt(med(o, "bucketed_8"))} | {_fmt(med(q, "longest"))} | '
        f'{_fmt(med(q, "grouped"))} | {_fmt(b_long)}x | {_ok(b_long, 1.5)} | {_fmt(b_grp)}x | '
        f'{_ok(b_grp, 1.0)} | {_fmt(b_fix)}x |'
    )
    po = o.get('padding_fraction', {}) if not _err(o) else {}
    pq = q.get('padding_fraction', {}) if not _err(q) else {}
    pad_rows.append(
        f'| {dist.name} | {_fmt(100 * po.get("fixed", float("nan")), 0)}% | '
        f'{_fmt(100 * po.get("bucketed", float("nan")), 0)}% | '
        f'{_fmt(100 * po.get("bucketed_8", float("nan")), 0)}% | '
        f'{_fmt(100 * pq.get("longest", float("nan")), 0)}% | '
        f'{_fmt(100 * pq.get("grouped", float("nan")), 0)}% | '
        f'{(o.get("buckets") or {}).get("bucketed", "n/a")} / '
        f'{(o.get("buckets") or {}).get("bucketed_8", "n/a")} | '
        f'{o.get("distinct_shapes", "n/a")} / {o.get("jit_cache_entries_after_timing", "n/a")} |'
    )
  add('')
  add(
      '| task | padding ours fixed | ours bucketed | ours bucketed 8 | PEFT pad-to-longest '
      '| PEFT group_by_length | bucket lengths (4 / 8) | shapes compiled / jit cache entries '
      'after timing |'
  )
  add('|---|---|---|---|---|---|---|---|')
  lines += pad_rows
  add('')
  add(
      'Input-length distributions used (T5 SentencePiece tokens of the `inputs` feature, task '
      'template and EOS included; log-normal through the median and 95th percentile, clipped to '
      '[shortest, longest], truncated at '
      f'{shapes.realistic_max_inputs}{" after scaling by " + str(shapes.realistic_max_inputs) + "/512" if shapes.realistic_max_inputs != 512 else ""}). '
      'These are estimates from published word counts at about 1.3 T5 tokens per word, not '
      'measurements of the datasets (nothing is downloaded):'
  )
  add('')
  add('| task | median | 95th pct | shortest | longest | basis |')
  add('|---|---|---|---|---|---|')
  for dist in common.DISTRIBUTIONS.values():
    add(
        f'| {dist.name} | {dist.median:g} | {dist.p95:g} | {dist.shortest} | {dist.longest} | '
        f'{dist.basis} |'
    )
  errors = [f'{w.get("error").strip().splitlines()[-1][:200]}' for w in workers if _err(w)]
  if errors:
    add('')
    add('Failures: ' + '; '.join(errors))
  lines += _commands(workers)
  return lines


def _render_bf16(key: str, res: Dict[str, Any]) -> List[str]:
  lines: List[str] = []
  add = lines.append
  shapes = common.SHAPES[res['shapes']]
  add('')
  add(f'## {key}: bfloat16 on the CPU')
  add('')
  if _err(res.get('prepare')):
    add(f'Preparing the checkpoint {_err(res["prepare"])}.')
    return lines
  dots = res.get('dots', {})
  add(
      "Matmul microbenchmark at the backbone's shapes in a training step (M = batch x (prompt + "
      'inputs) positions; the attention projections and the gated-GELU MLP), GFLOP/s, median of '
      f'{shapes.dots_reps} calls. Ours: jitted `jnp.dot` with float32 operands, bfloat16 operands '
      'and result (what the layers emit with bfloat16 activations), and bfloat16 operands with '
      'a float32 result (`preferred_element_type=jnp.float32`), under each `XLA_FLAGS` setting; '
      'PEFT: `torch.mm` float32 and bfloat16.'
  )
  add('')
  add(
      '| run | dtype | '
      + ' | '.join(f'{m}x{k}x{n}' for m, k, n in common.dot_shapes(shapes))
      + ' |'
  )
  add('|---|---|' + '---|' * len(common.dot_shapes(shapes)))
  workers = []
  for name, w in dots.items():
    workers.append(w)
    if _err(w):
      add(f'| {name} | {_err(w)} |' + ' |' * len(common.dot_shapes(shapes)))
      continue
    label = (
        'PEFT `torch.mm`'
        if name == 'peft'
        else f'ours `jnp.dot`, XLA flags {name}'
        + (f' (`{XLA_BF16_FLAGS[name]}`)' if XLA_BF16_FLAGS.get(name) else '')
    )
    for dt in ('f32', 'bf16', 'bf16_f32acc'):
      cells = [w.get(f'{dt}_{m}x{k}x{n}_gflops') for m, k, n in common.dot_shapes(shapes)]
      if all(c is None for c in cells):
        continue
      dt_name = {'f32': 'float32', 'bf16': 'bfloat16', 'bf16_f32acc': 'bfloat16 -> float32'}[dt]
      add(f'| {label} | {dt_name} | ' + ' | '.join(_fmt(c, 0) for c in cells) + ' |')
  train = res.get('train', {})
  p = res.get('prompt_length')
  add('')
  add(
      f'Training step of section 1 (batch {shapes.batch}, inputs {shapes.inputs}, targets '
      f'{shapes.targets}, prompt {p}; {shapes.train_reps} repetitions of {shapes.train_steps} '
      'steps, all five workers interleaved). Ours bfloat16: `T5Config.dtype = bfloat16` '
      '(activations in bfloat16, weights stored float32 and cast, layer-norm statistics and '
      'logits float32; the dense matmuls take bfloat16 operands and accumulate in float32, '
      '`layers.dense_dot`). Ours bfloat16 plain dots: the same with the dense matmuls emitting '
      'bfloat16 (`bench_ours --dots plain`, the layers before `dense_dot`). PEFT bfloat16: the '
      'transformers model loaded with `dtype=torch.bfloat16`.'
  )
  add('')
  add('| variant | ex/s | vs ours float32 | vs PEFT float32 | vs PEFT bfloat16 | first-step loss |')
  add('|---|---|---|---|---|---|')
  get = lambda n: train.get(n) if train.get(n) and not _err(train.get(n)) else None
  for name, w in train.items():
    workers.append(w)
    if _err(w):
      add(f'| {name} | {_err(w)} | | | | |')
      continue
    ex = w['examples_per_s']
    ratio = (
        lambda other: _pair_ratio(ex, get(other)['examples_per_s']) if get(other) else float('nan')
    )
    add(
        f'| {name.replace("_", " ")} | {_fmt(_med(ex))} | {_fmt(ratio("ours_float32"))}x | '
        f'{_fmt(ratio("peft_float32"))}x | {_fmt(ratio("peft_bfloat16"))}x | '
        f'{_fmt(w.get("first_loss"), 4)} |'
    )
  lines += _commands(workers)
  return lines


def _all_workers(res):
  for section in ('train', 'serve', 'decode', 'pinned_train', 'pinned_serve', 'pinned_decode'):
    for p, r in (res.get(section) or {}).items():
      for fw in ('ours', 'peft'):
        if r.get(fw) is not None:
          yield f'{section} {fw} p{p}', r[fw]


def jax_default_backend() -> str:
  """JAX's default backend without an override (`cpu`, `gpu`, `tpu`), from a subprocess."""
  env = dict(os.environ)
  env.pop('JAX_PLATFORMS', None)
  try:
    out = subprocess.run(
        [sys.executable, '-c', 'import jax; print(jax.default_backend())'],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else 'unknown'
  except (subprocess.TimeoutExpired, IndexError):
    return 'unknown'


def _add_analysis(meta: Dict[str, Any]) -> None:
  """Appends the hand-written benchmarks/ANALYSIS.md (profiling notes) to the report."""
  analysis = os.path.join(HERE, 'ANALYSIS.md')
  if os.path.exists(analysis):
    with open(analysis) as f:
      meta['analysis'] = f.read()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--quick', action='store_true', help='tiny shapes, one repetition')
  parser.add_argument(
      '--output',
      default=None,
      help='RESULTS.md path (default benchmarks/RESULTS.md; quick mode: '
      'benchmarks/RESULTS.quick.md)',
  )
  parser.add_argument('--workdir', default=None, help='scratch dir (default: a temp dir)')
  parser.add_argument('--keep-workdir', action='store_true')
  parser.add_argument(
      '--pinned',
      default='train,serve,decode',
      help='sections compared again on one core with one thread each '
      '(default: train,serve,decode)',
  )
  parser.add_argument(
      '--torch-omp-active',
      action='store_true',
      help='leave OMP_WAIT_POLICY unset for PEFT (spinning OpenMP threads)',
  )
  parser.add_argument(
      '--no-pinned', action='store_true', help='skip the one-core, one-thread comparisons'
  )
  parser.add_argument(
      '--render-only',
      action='store_true',
      help='re-render the output from its .json (e.g. after editing ANALYSIS.md)',
  )
  parser.add_argument(
      '--ours-gin',
      action='append',
      default=[],
      metavar='BINDING',
      help="a gin binding for ours' workers (repeatable), e.g. "
      '"training_forward_compiler_options.cpu_float32_dots = \'eigen\'" (the split training '
      'step); the report lists them',
  )
  load_guard.add_arguments(parser)
  parser.add_argument('--gpu-section-on-cpu', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument(
      '--sections',
      default=','.join(SECTIONS),
      help='comma-separated subset of ' + ', '.join(SECTIONS) + ' (default: all). Without `main` '
      'the report goes to benchmarks/RESULTS.<sections>.md, so RESULTS.md keeps the main run.',
  )
  args = parser.parse_args(argv)
  sections = [x for x in args.sections.split(',') if x]
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    parser.error(f'unknown --sections {unknown}; choose from {list(SECTIONS)}')
  t_start = time.time()
  if args.ours_gin:  # ours' workers read it (bench_ours.apply_gin_bindings); PEFT's ignore it
    os.environ[common.OURS_GIN_ENV] = '\n'.join(args.ours_gin)
  if args.torch_omp_active:
    TORCH_ENV.clear()
  stem = 'RESULTS' + ('' if 'main' in sections else '.' + '_'.join(sections))
  output = args.output or os.path.join(HERE, stem + ('.quick' if args.quick else '') + '.md')
  if args.render_only:
    with open(os.path.splitext(output)[0] + '.json') as f:
      raw = json.load(f)
    meta = raw['meta']
    meta.pop('analysis', None)
    _add_analysis(meta)
    with open(output, 'w') as f:
      f.write(render(raw['results'], meta))
    print(f'wrote {output}')
    return 0
  # Where the report goes must exist before the run, not only after its ten minutes.
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  guard = dict(
      max_interference=args.max_interference,
      retries=0 if args.quick else args.retries,
      wait_quiet_s=args.wait_quiet,
  )
  quiet = load_guard.busiest_now([os.getpid()], 1.0)
  if not args.quick:
    quiet = load_guard.refuse_if_busy(args)
    if quiet is None:
      return 2
  workdir = args.workdir or tempfile.mkdtemp(prefix='pt_bench_')
  os.makedirs(workdir, exist_ok=True)
  log_dir = os.path.join(workdir, 'logs')
  os.makedirs(log_dir, exist_ok=True)
  print(f'workdir {workdir} (worker logs in {log_dir})')
  meta = {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'machine': _machine(),
      'quick': args.quick,
      'load_start': common.load_avg(),
      'cpu_info': load_guard.cpu_info(),
      'quiet_at_start': quiet,
      'max_interference': args.max_interference,
      'command': 'python -m benchmarks.run'
      + (' --quick' if args.quick else '')
      + (f' --sections {",".join(sections)}' if set(sections) != set(SECTIONS) else ''),
      'torch_env': dict(TORCH_ENV),
  }
  meta['backend'] = jax_default_backend()
  results: Dict[str, Any] = {}
  try:
    cpu_shapes = common.SHAPES['quick' if args.quick else 'full']
    cpu_name = 'CPU, T5 1.1 small shape' if not args.quick else 'CPU, tiny'
    if 'main' in sections:
      results[cpu_name] = run_suite(
          cpu_shapes,
          os.path.join(workdir, cpu_shapes.name),
          'float32',
          log_dir,
          one_process=args.quick,
          pinned=() if (args.no_pinned or args.quick) else tuple(args.pinned.split(',')),
          **guard,
      )
    if 'realistic' in sections:
      meta['load_realistic_start'] = common.load_avg()
      results[cpu_name + ', realistic lengths'] = run_realistic(
          cpu_shapes, os.path.join(workdir, cpu_shapes.name), log_dir, one_process=args.quick
      )
      meta['load_realistic_end'] = common.load_avg()
    if 'bf16' in sections:
      meta['load_bf16_start'] = common.load_avg()
      results[cpu_name + ', bfloat16'] = run_bf16(
          cpu_shapes, os.path.join(workdir, cpu_shapes.name), log_dir
      )
      meta['load_bf16_end'] = common.load_avg()
    on_gpu = meta['backend'] in ('gpu', 'cuda', 'rocm')
    if 'main' in sections and (on_gpu or args.gpu_section_on_cpu):
      names = (
          ['gpu_tiny'] if (args.gpu_section_on_cpu and not on_gpu) else ['gpu_base', 'gpu_large']
      )
      for name in names:
        shapes = common.SHAPES[name]
        results[f'GPU, {name}'] = run_suite(
            shapes,
            os.path.join(workdir, name),
            'bfloat16',
            log_dir,
            one_process=name == 'gpu_tiny',
            cpu_only=name == 'gpu_tiny',
            **guard,
        )
      meta['gpu_note'] = (
          'Ran on ' + meta['backend'] + ' (bfloat16 activations, utilisation vs a '
          'bfloat16 matmul); see the GPU tables above.'
      )
    elif 'main' in sections:
      meta['gpu_note'] = (
          f'Skipped: JAX sees no GPU (backend `{meta["backend"]}`). On a machine '
          'with a GPU (`pip install -e .[gpu,bench]`) the same command also runs '
          'the three comparisons for T5 1.1 base and large in bfloat16, with '
          'utilisation against a bfloat16 8192x8192 matmul.'
      )
      print('GPU section skipped: JAX sees no GPU.')
  finally:
    meta['wall_min'] = (time.time() - t_start) / 60
    meta['load_end'] = common.load_avg()
    if not args.quick:
      _add_analysis(meta)
    # The measurements first: a report that fails to render can be re-rendered from them.
    common.write_json(os.path.splitext(output)[0] + '.json', {'meta': meta, 'results': results})
    text = render(results, meta)
    with open(output, 'w') as f:
      f.write(text)
    print(f'wrote {output} ({meta["wall_min"]:.1f} min)')
    if not args.keep_workdir and not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  sys.exit(main())
