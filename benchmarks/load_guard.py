"""What else ran on the machine while a benchmark section was timed, and whether that was too much.

Background load does not slow both frameworks alike: PyTorch's many short OpenMP parallel regions
lose more to a descheduled thread than XLA's few large kernels, so a loaded machine flatters ours
(issue 17: 1.14x on a loaded Intel Xeon, 0.86x on the same machine quiet). Every section of
`benchmarks.run` is therefore bracketed by `Section`: it records the load average and the busiest
other processes before and after, and over the timed repetitions it measures the CPU time the rest
of the machine used (all busy time in `/proc/stat`, minus this benchmark's own process tree) and the
time the hypervisor stole. A section whose interference exceeds the tolerance is invalid, and
`benchmarks/RESULTS.md` says so next to its numbers.

Only `/proc` is read (Linux); elsewhere the records say `unavailable` and no verdict is given.
"""

import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

# CPU flags that decide which matmul kernels a framework can use; recorded with every run.
ISA_FLAGS = (
    'avx2',
    'fma',
    'avx512f',
    'avx512bw',
    'avx512vl',
    'avx512_vnni',
    'avx512_bf16',
    'avx512_fp16',
    'amx_tile',
    'amx_bf16',
    'amx_int8',
    'avx_vnni',
)

# Default tolerance: other processes plus steal may keep at most this many cores busy, on
# average over a section's timed repetitions (a quiet machine shows about 0.01-0.05).
DEFAULT_MAX_INTERFERENCE = 0.15

_HZ = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100


def cpu_info() -> Dict[str, Any]:
  """CPU model, vendor, logical CPUs, hypervisor and the matmul-relevant ISA flags."""
  info: Dict[str, Any] = {'logical_cpus': os.cpu_count()}
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
  except OSError:
    return info
  fields = {}
  for line in text.splitlines():
    if ':' in line:
      k, v = line.split(':', 1)
      fields.setdefault(k.strip(), v.strip())
  info['model'] = fields.get('model name', 'unknown')
  info['vendor'] = fields.get('vendor_id', 'unknown')
  flags = set(fields.get('flags', '').split())
  info['isa'] = [f for f in ISA_FLAGS if f in flags]
  info['hypervisor'] = 'hypervisor' in flags
  return info


def _read_stat_cpus() -> Optional[Dict[str, List[int]]]:
  try:
    with open('/proc/stat') as f:
      lines = [l.split() for l in f if l.startswith('cpu')]
  except OSError:
    return None
  return {l[0]: [int(x) for x in l[1:]] for l in lines}


def _busy_and_steal(values: Sequence[int]):
  # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user).
  user, nice, system, _, _, irq, softirq = values[:7]
  steal = values[7] if len(values) > 7 else 0
  return user + nice + system + irq + softirq, steal


def _proc_table() -> Dict[int, tuple]:
  """`{pid: (ppid, cpu ticks (utime + stime), command line, start time)}` of every process."""
  out = {}
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    pid = int(name)
    try:
      with open(f'/proc/{pid}/stat') as f:
        stat = f.read()
      rest = stat[stat.rindex(')') + 2 :].split()
      ppid, ticks, started = int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        cmd = f.read().replace(b'\0', b' ').decode('utf-8', 'replace').strip()
      if not cmd:
        cmd = '[' + stat[stat.index('(') + 1 : stat.rindex(')')] + ']'
    except (OSError, ValueError, IndexError):
      continue
    out[pid] = (ppid, ticks, cmd, started)
  return out


def _tree(table: Dict[int, tuple], roots: Iterable[int]) -> set:
  """`roots` and all their descendants."""
  children: Dict[int, List[int]] = {}
  for pid, (ppid, *_) in table.items():
    children.setdefault(ppid, []).append(pid)
  seen, todo = set(), list(roots)
  while todo:
    pid = todo.pop()
    if pid in seen:
      continue
    seen.add(pid)
    todo.extend(children.get(pid, ()))
  return seen


class Snapshot:
  """CPU counters of the whole machine and of every process at one moment."""

  def __init__(self):
    self.time = time.monotonic()
    self.cpus = _read_stat_cpus()
    self.procs = _proc_table() if self.cpus is not None else {}
    self.load = load_avg()


def load_avg() -> Optional[List[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def interference(
    start: Snapshot,
    end: Snapshot,
    own_roots: Iterable[int],
    cpus: Optional[Sequence[int]] = None,
    top: int = 5,
) -> Dict[str, Any]:
  """What the rest of the machine used between two snapshots, in cores (busy seconds / second).

  Args:
    start: the earlier snapshot.
    end: the later snapshot.
    own_roots: the pids whose process trees are the benchmark itself (not interference).
    cpus: restrict to these logical CPUs (a pinned section: only its core counts).
    top: how many of the busiest other processes to list.

  Returns:
    `{'seconds', 'others_cores', 'steal_cores', 'interference_cores', 'own_cores',
    'busiest': [{'pid', 'cores', 'command'}], ...}`, or `{'unavailable': reason}`.
  """
  if start.cpus is None or end.cpus is None:
    return {'unavailable': '/proc/stat is not readable'}
  dt = end.time - start.time
  if dt <= 0:
    return {'unavailable': 'empty interval'}
  keys = ['cpu'] if cpus is None else [f'cpu{c}' for c in cpus]
  busy = steal = 0
  for k in keys:
    if k not in start.cpus or k not in end.cpus:
      return {'unavailable': f'no {k} in /proc/stat'}
    b0, s0 = _busy_and_steal(start.cpus[k])
    b1, s1 = _busy_and_steal(end.cpus[k])
    busy += b1 - b0
    steal += s1 - s0
  own = _tree(end.procs, own_roots) | _tree(start.procs, own_roots)
  own_ticks, per_pid = 0, []
  for pid, (_, ticks, cmd, started) in end.procs.items():
    before = start.procs.get(pid)
    # A pid seen before with the same start time is the same process (kernel threads rename
    # themselves, so the command line is no identity); otherwise it started in between.
    delta = ticks - (before[1] if before and before[3] == started else 0)
    if delta <= 0:
      continue
    if pid in own:
      own_ticks += delta
    else:
      per_pid.append((delta, pid, cmd))
  per_pid.sort(reverse=True)
  to_cores = lambda ticks: ticks / _HZ / dt
  # Pinned (`cpus` given): our processes ran only there, so what else kept those cores busy is
  # their busy time minus ours; other processes elsewhere do not count.
  others = max(0.0, to_cores(busy - own_ticks))
  return {
      'seconds': round(dt, 2),
      'cpus': list(cpus) if cpus is not None else 'all',
      'own_cores': round(to_cores(own_ticks), 3),
      'others_cores': round(others, 3),
      'steal_cores': round(to_cores(steal), 3),
      'interference_cores': round(others + to_cores(steal), 3),
      'busiest': [
          {'pid': pid, 'cores': round(to_cores(d), 3), 'command': cmd[:120]}
          for d, pid, cmd in per_pid[:top]
      ],
  }


def busiest_now(own_roots: Iterable[int], seconds: float = 0.5) -> Dict[str, Any]:
  """Load average and the busiest other processes, sampled over `seconds`."""
  a = Snapshot()
  time.sleep(seconds)
  b = Snapshot()
  res = interference(a, b, own_roots)
  res['load_avg'] = b.load
  return res


class Section:
  """Brackets one benchmark section: `before()`, `timed_start()`, `timed_end()`, `after()`.

  `record()` is what goes into the results: the load and busiest processes before and after,
  the interference during the timed repetitions and the verdict against `max_interference`.
  """

  def __init__(
      self,
      own_roots: Sequence[int],
      max_interference: float = DEFAULT_MAX_INTERFERENCE,
      cpus: Optional[Sequence[int]] = None,
  ):
    self.own_roots = list(own_roots)
    self.max_interference = max_interference
    self.cpus = cpus
    self.rec: Dict[str, Any] = {'max_interference_cores': max_interference}
    self._t0 = None

  def add_roots(self, pids: Iterable[int]) -> None:
    self.own_roots.extend(pids)

  def before(self) -> None:
    self.rec['before'] = busiest_now(self.own_roots)

  def timed_start(self) -> None:
    self._t0 = Snapshot()

  def timed_end(self) -> None:
    if self._t0 is not None:
      self.rec['during'] = interference(self._t0, Snapshot(), self.own_roots, self.cpus)

  def after(self) -> None:
    self.rec['after'] = busiest_now(self.own_roots)

  def record(self) -> Dict[str, Any]:
    during = self.rec.get('during') or {}
    if 'interference_cores' not in during:
      self.rec['valid'] = None
      self.rec['verdict'] = 'unmeasured: ' + during.get('unavailable', 'no timed repetitions')
    elif during['interference_cores'] > self.max_interference:
      self.rec['valid'] = False
      self.rec['verdict'] = (
          f'INVALID: other processes and steal kept {during["interference_cores"]:.2f} cores '
          f'busy (tolerance {self.max_interference:.2f})'
      )
    else:
      self.rec['valid'] = True
      self.rec['verdict'] = 'valid'
    return self.rec


def wait_for_quiet(
    max_interference: float, timeout_s: float, log=print, sample_s: float = 2.0
) -> Dict[str, Any]:
  """Samples the machine until other processes use at most `max_interference` cores, or timeout.

  Returns the last sample with `quiet` set.
  """
  deadline = time.monotonic() + timeout_s
  while True:
    sample = busiest_now([os.getpid()], sample_s)
    level = sample.get('interference_cores')
    sample['quiet'] = level is None or level <= max_interference
    if sample['quiet'] or time.monotonic() >= deadline:
      return sample
    top = ', '.join(f'{p["command"][:60]} ({p["cores"]:.2f})' for p in sample['busiest'][:3])
    log(
        f'machine busy: other processes use {level:.2f} cores (tolerance '
        f'{max_interference:.2f}); waiting. Busiest: {top}'
    )
    time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def add_arguments(parser) -> None:
  """The load-guard options every benchmark entry point takes."""
  parser.add_argument(
      '--max-interference',
      type=float,
      default=DEFAULT_MAX_INTERFERENCE,
      help='cores of other work (other processes + hypervisor steal) a measurement tolerates while '
      'it is timed; above it the measurement is re-run, then marked INVALID (default %(default)s)',
  )
  parser.add_argument(
      '--wait-quiet',
      type=float,
      default=300.0,
      help='seconds to wait for a quiet machine at the start and before a re-run '
      '(default %(default)s)',
  )
  parser.add_argument(
      '--retries',
      type=int,
      default=1,
      help='re-runs of a measurement found invalid (default %(default)s)',
  )
  parser.add_argument(
      '--allow-load',
      action='store_true',
      help='start even if the machine is busy (every measurement will say whether it was valid)',
  )


def refuse_if_busy(args, log=print) -> Optional[Dict[str, Any]]:
  """Waits for quiet (`add_arguments`' options); returns the quiet sample, or None after printing
  why a busy machine is refused (unless `--allow-load`)."""
  quiet = wait_for_quiet(args.max_interference, args.wait_quiet, log)
  if quiet['quiet'] or args.allow_load:
    return quiet
  top = '; '.join(
      f'pid {b["pid"]} {b["command"][:80]} ({b["cores"]:.2f} cores)' for b in quiet['busiest']
  )
  print(
      f'Refusing to benchmark: other processes keep {quiet["interference_cores"]:.2f} cores '
      f'busy (tolerance {args.max_interference:.2f}, waited {args.wait_quiet:.0f} s). A loaded '
      'machine flatters ours (see benchmarks/ANALYSIS.md). Busiest: '
      f'{top}. Stop them, or pass --allow-load to measure anyway (every measurement is then '
      'marked valid or INVALID).',
      file=sys.stderr,
  )
  return None
