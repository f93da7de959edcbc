"""The benchmark's load guard (`benchmarks/load_guard.py`): interference arithmetic on made-up
counters, and a real busy process that must be seen as other work unless it belongs to the run."""

import os
import subprocess
import sys
import time

import pytest

from benchmarks import load_guard

pytestmark = pytest.mark.skipif(not os.path.exists('/proc/stat'), reason='needs Linux /proc')


def _snapshot(t, cpus, procs):
  snap = load_guard.Snapshot.__new__(load_guard.Snapshot)
  snap.time, snap.cpus, snap.procs, snap.load = t, cpus, procs, [0.0, 0.0, 0.0]
  return snap


def _cpu(busy_user, steal=0):
  # user nice system idle iowait irq softirq steal guest guest_nice
  return [busy_user, 0, 0, 1000, 0, 0, 0, steal, 0, 0]


HZ = load_guard._HZ  # pylint: disable=protected-access


def test_interference_is_machine_busy_time_minus_the_runs_own_tree_plus_steal():
  procs0 = {
      10: (1, 0, 'orchestrator', 0),
      11: (10, 0, 'worker ours', 0),
      12: (11, 0, 'compile helper', 0),  # a child of a worker: still the run's own
      20: (1, 0, 'somebody elses training', 0),
      21: (1, 0, 'a test', 0),
      30: (2, 10000, '[kworker/u8:1-events]', 5),
      31: (1, 500, 'a process that exits', 7),
  }
  # Over 2 s: the run used 1.5 cores (3 core-seconds), others 0.5 + 0.25 cores, a kernel thread
  # that renamed itself 0.05, a new process that got pid 31 0.1; steal 0.1.
  procs1 = {
      10: (1, int(0.1 * HZ), 'orchestrator', 0),
      11: (10, int(2.4 * HZ), 'worker ours', 0),
      12: (11, int(0.5 * HZ), 'compile helper', 0),
      20: (1, int(1.0 * HZ), 'somebody elses training', 0),
      21: (1, int(0.5 * HZ), 'a test', 0),
      30: (2, 10000 + int(0.1 * HZ), '[kworker/u8:1-kvfree_rcu_reclaim]', 5),
      31: (1, int(0.2 * HZ), 'a new process with a reused pid', 99),
  }
  busy = int((3.0 + 1.5 + 0.1 + 0.2) * HZ)
  a = _snapshot(0.0, {'cpu': _cpu(0), 'cpu0': _cpu(0), 'cpu1': _cpu(0)}, procs0)
  b = _snapshot(
      2.0,
      {'cpu': _cpu(busy, int(0.2 * HZ)), 'cpu0': _cpu(busy // 2), 'cpu1': _cpu(busy // 2)},
      procs1,
  )
  res = load_guard.interference(a, b, [10])
  assert res['own_cores'] == pytest.approx(1.5, abs=0.02)
  assert res['others_cores'] == pytest.approx(0.9, abs=0.02)
  assert res['steal_cores'] == pytest.approx(0.1, abs=0.02)
  assert res['interference_cores'] == pytest.approx(1.0, abs=0.03)
  assert [p['pid'] for p in res['busiest']] == [20, 21, 31, 30]
  assert res['busiest'][3]['cores'] == pytest.approx(0.05, abs=0.01)


def test_a_pinned_section_counts_only_its_own_core():
  # Over 2 s the run (pinned to core 1) used 0.8 cores; core 1 was busy 0.95 of the time, core 0
  # fully busy with somebody else's work, which does not disturb the pinned run.
  procs0 = {10: (1, 0, 'pinned worker', 0), 20: (1, 0, 'elsewhere', 0)}
  procs1 = {10: (1, int(1.6 * HZ), 'pinned worker', 0), 20: (1, int(2.0 * HZ), 'elsewhere', 0)}
  a = _snapshot(0.0, {'cpu': _cpu(0), 'cpu0': _cpu(0), 'cpu1': _cpu(0)}, procs0)
  b = _snapshot(
      2.0,
      {'cpu': _cpu(int(3.9 * HZ)), 'cpu0': _cpu(int(2.0 * HZ)), 'cpu1': _cpu(int(1.9 * HZ))},
      procs1,
  )
  pinned = load_guard.interference(a, b, [10], cpus=[1])
  assert pinned['cpus'] == [1]
  assert pinned['others_cores'] == pytest.approx(0.15, abs=0.02)
  whole = load_guard.interference(a, b, [10])
  assert whole['others_cores'] == pytest.approx(1.15, abs=0.02)


def test_a_section_over_its_tolerance_is_invalid():
  section = load_guard.Section([os.getpid()], max_interference=0.2)
  section.rec['during'] = {'interference_cores': 0.5}
  rec = section.record()
  assert rec['valid'] is False and rec['verdict'].startswith('INVALID')
  section = load_guard.Section([os.getpid()], max_interference=0.2)
  section.rec['during'] = {'interference_cores': 0.1}
  assert section.record()['valid'] is True
  section = load_guard.Section([os.getpid()])
  assert section.record()['valid'] is None  # never timed: no verdict


def test_a_real_busy_process_is_other_work_unless_it_is_the_runs_own():
  busy = subprocess.Popen([sys.executable, '-c', 'while True: pass'])
  try:
    time.sleep(0.3)
    a = load_guard.Snapshot()
    time.sleep(1.0)
    b = load_guard.Snapshot()
    other = load_guard.interference(
        a, b, [os.getpid() + 10**7], top=10**6
    )  # a root that does not exist
    mine = load_guard.interference(a, b, [os.getpid()], top=10**6)  # the busy loop is our child
  finally:
    busy.kill()
    busy.wait()
  seen = {p['pid']: p['cores'] for p in other['busiest']}
  assert seen.get(busy.pid, 0) > 0.02, other  # even on a loaded machine it gets some CPU
  assert busy.pid not in {p['pid'] for p in mine['busiest']}
  assert mine['own_cores'] > 0.02
  assert other['others_cores'] >= mine['others_cores']


def test_cpu_info_names_the_model_and_the_isa():
  info = load_guard.cpu_info()
  assert info['logical_cpus'] == os.cpu_count()
  assert info['model'] and info['vendor']
  assert set(info['isa']) <= set(load_guard.ISA_FLAGS)
