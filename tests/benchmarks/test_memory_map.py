"""`common.memory_map`: a worker's resident memory by mapping (`/proc/self/smaps`) and, under
tcmalloc, by what the allocator holds (gperftools' `MallocExtension_GetStats`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import common
from prompt_tuning.runtime import launch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMAPS = """\
00400000-00600000 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libjax_common.so.0
Size:               2048 kB
Rss:                1024 kB
7f00-7f10 rw-p 00000000 00:00 0 [heap]
Rss:                3072 kB
7f10-7f20 rw-p 00000000 00:00 0
Rss:                 512 kB
VmFlags: rd wr mr mw me ac sd
7f20-7f30 rw-p 00000000 08:01 43 /site-packages/torch/lib/libtorch_cpu.so
Rss:                2048 kB
7f30-7f40 r--p 00000000 08:01 43 /site-packages/torch/lib/libtorch_cpu.so
Rss:                2048 kB
7f40-7f50 r--p 00000000 08:01 44 /tmp/model.safetensors
Rss:                 256 kB
7f50-7f60 rw-p 00000000 00:00 0
Rss:                 256 kB
"""


def test_mappings_are_named_summed_and_ranked(tmp_path):
  path = tmp_path / 'smaps'
  path.write_text(SMAPS)
  out = common.rss_by_mapping_mb(str(path), top=3)
  # Both libtorch mappings under one name, the two anonymous ones together, the rest as `other`.
  assert out == {'libtorch_cpu.so': 4.0, '[heap]': 3.0, 'libjax_common.so': 1.0, 'other': 1.0}
  assert list(out)[:3] == ['libtorch_cpu.so', '[heap]', 'libjax_common.so']
  assert sum(common.rss_by_mapping_mb(str(path), top=100).values()) == 9.0
  assert common.rss_by_mapping_mb(str(tmp_path / 'missing')) == {}


def test_the_mappings_of_this_process_sum_to_its_rss_and_see_an_array():
  if not os.path.exists('/proc/self/smaps'):
    pytest.skip('no /proc/self/smaps')
  before = common.rss_by_mapping_mb(top=1000)
  assert sum(before.values()) == pytest.approx(common.rss_mb(), rel=0.02, abs=2)
  x = np.ones(200 * 2**20, np.uint8)  # every page written
  after = common.rss_by_mapping_mb(top=1000)
  grown = sum(after.values()) - sum(before.values())
  assert 190 <= grown <= 215, (grown, before, after)
  anon = lambda m: m.get('[anon]', 0.0) + m.get('[heap]', 0.0)
  assert anon(after) - anon(before) >= 190  # in the anonymous memory, not in a library's
  del x


TCMALLOC_TEXT = """\
------------------------------------------------
MALLOC:      432797808 (  412.7 MiB) Bytes in use by application
MALLOC: +    502153216 (  478.9 MiB) Bytes in page heap freelist
MALLOC: +     36102792 (   34.4 MiB) Bytes in central cache freelist
MALLOC: +      6188288 (    5.9 MiB) Bytes in transfer cache freelist
MALLOC: +     25802760 (   24.6 MiB) Bytes in thread cache freelists
MALLOC: +      5767168 (    5.5 MiB) Bytes in malloc metadata
MALLOC:   ------------
MALLOC: =   1008812032 (  962.1 MiB) Actual memory used (physical + swap)
MALLOC: +    157810688 (  150.5 MiB) Bytes released to OS (aka unmapped)
MALLOC:          16163              Spans in use
"""


def test_tcmalloc_statistics_are_parsed_from_bytes():
  out = common.parse_tcmalloc_stats(TCMALLOC_TEXT)
  assert out == {
      'in_use': 412.7,
      'page_heap_free': 478.9,
      'central_cache_free': 34.4,
      'transfer_cache_free': 5.9,
      'thread_cache_free': 24.6,
      'metadata': 5.5,
      'total': 962.1,
      'released': 150.5,
  }
  assert common.parse_tcmalloc_stats('no statistics here') == {}


def test_tcmalloc_statistics_of_a_live_process_add_up_and_see_an_array():
  if 'tcmalloc' not in os.environ.get('LD_PRELOAD', ''):
    assert common.tcmalloc_stats_mb() is None  # glibc's allocator: nothing to report
  lib = launch.find_tcmalloc()
  if not lib:
    pytest.skip('no tcmalloc library installed (Debian: apt-get install libtcmalloc-minimal4)')
  code = (
      'import json, numpy as np\n'
      'from benchmarks import common\n'
      'before = common.tcmalloc_stats_mb()\n'
      'x = np.ones(100 * 2**20, np.uint8)\n'
      'print(json.dumps([before, common.tcmalloc_stats_mb(), common.memory_map()]))\n'
  )
  env = dict(os.environ, LD_PRELOAD=lib, PYTHONPATH=REPO)
  proc = subprocess.run(
      [sys.executable, '-c', code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  before, after, mem = json.loads(proc.stdout.strip().splitlines()[-1])
  assert after['in_use'] - before['in_use'] == pytest.approx(100, abs=2)
  parts = ('in_use', 'page_heap_free', 'central_cache_free', 'transfer_cache_free')
  parts += ('thread_cache_free', 'metadata')
  assert sum(after[k] for k in parts) == pytest.approx(after['total'], abs=0.5)
  assert mem['tcmalloc']['in_use'] >= 100
  assert sum(mem['by_mapping'].values()) == pytest.approx(mem['rss'], rel=0.02, abs=2)
