"""`python -m prompt_tuning.serve` end to end: a frozen T5X checkpoint, a prompt library, the gin
entry point; answers equal `prompt_tuning.infer` offline; the library is hot-reloaded; entries of
another backbone or shape are left out with the reason; SIGTERM finishes the requests in flight;
`--workers 2` serves from two processes behind one address.
"""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'runtime')
)
import runtime_testlib as rt  # pylint: disable=g-import-not-at-top,wrong-import-position
import tiny_task  # pylint: disable=g-import-not-at-top,wrong-import-position
from prompt_tuning import library  # pylint: disable=g-import-not-at-top,wrong-import-position
from prompt_tuning.serving import server as server_lib  # pylint: disable=wrong-import-position

P, H = 5, 32  # test/tiny_prompt.gin: PROMPT_LENGTH 5, EMBED_DIM 32.
SERVE_GIN = ('test/tiny_prompt.gin', 'runs/serve.gin')


def _bindings(frozen):
  return {
      'CHECKPOINT_PATH': rt.q(frozen),
      'NUM_PROMPTS': '8',
      'seqio.SentencePieceVocabulary.sentencepiece_model_file': rt.q(rt.vocab_path()),
      'engine.ServingConfig.batch_buckets': '(1, 8)',
      'engine.ServingConfig.input_buckets': '(24,)',
      'engine.ServingConfig.target_buckets': '(8,)',
      'engine.ServingConfig.max_decode_length': '8',
      'engine.ServingConfig.beam_sizes': '(2,)',
      'engine.ServingConfig.poll_interval_s': '0.3',
      'engine.ServingConfig.max_wait_ms': '20.0',
  }


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('serve')
  cache = rt.shared_cache_dir(tmp_path_factory)
  frozen = rt.make_t5x_checkpoint(str(root / 'frozen'))
  other = rt.make_t5x_checkpoint(str(root / 'other'), seed=7)
  lib_dir = str(root / 'library')
  lib = library.Library(lib_dir)
  rng = np.random.default_rng(0)
  prompts = {f'task{i}': rng.normal(0, 1.5, (P, H)).astype(np.float32) for i in range(3)}
  for name, value in prompts.items():
    lib.add(name, value, {'task': 'tiny_count'}, backbone=frozen)
  lib.add('foreign', prompts['task0'], {'task': 'tiny_count'}, backbone=other)
  lib.add('longer', rng.normal(size=(P + 2, H)).astype(np.float32), backbone=frozen)
  return {'root': root, 'cache': cache, 'frozen': frozen, 'lib': lib, 'prompts': prompts}


def _start(setup, port, extra=(), **overrides):
  env = rt.base_env(setup['cache'])
  args = rt.entry_args(
      'prompt_tuning.serve',
      SERVE_GIN,
      {**_bindings(setup['frozen']), **overrides},
      [f'--library={setup["lib"].path}', f'--port={port}', *extra],
  )
  log = open(str(setup['root'] / f'serve_{port}.log'), 'w')
  proc = subprocess.Popen(args, env=env, cwd=rt.REPO, stdout=log, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 600
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(open(log.name).read()[-4000:])
    try:
      if httpx.get(url + '/healthz', timeout=2).status_code == 200:
        return proc, url, log.name
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise AssertionError('server did not start: ' + open(log.name).read()[-4000:])


@pytest.fixture(scope='module')
def server(setup):
  proc, url, log = _start(setup, server_lib.free_port())
  yield proc, url, log
  if proc.poll() is None:
    proc.kill()
    proc.wait()


# Greedy decoding (the server's "greedy" method) and the infer mode, for the offline reference.
_GREEDY_GIN = """
from __gin__ import dynamic_registration
import __main__ as infer_script
from prompt_tuning.runtime import decoding
from prompt_tuning.runtime import models

infer_script.infer.mode = '{mode}'
models.EncoderDecoderModel.decode_fn = @decoding.temperature_sample
decoding.temperature_sample.topk = 1
"""


def _offline(setup, name, mode, out_dir):
  """`prompt_tuning.infer` of tiny_count's validation split with the library prompt `name`."""
  bindings = rt.serve_bindings(setup['frozen'], f'library:{name}', 'INFER_OUTPUT_DIR', out_dir)
  bindings['LIBRARY_DIR'] = rt.q(setup['lib'].path)
  extra = out_dir + '.gin'
  with open(extra, 'w') as f:
    f.write(_GREEDY_GIN.format(mode=mode))
  gin_files = ('test/tiny_prompt.gin', 'runs/prompt_infer.gin', extra)
  proc = rt.run(
      rt.entry_args('prompt_tuning.infer', gin_files, bindings), rt.base_env(setup['cache'])
  )
  rt.check_ok(proc, f'offline infer ({mode})')
  with open(os.path.join(out_dir, 'tiny_count-validation.jsonl')) as f:
    return [json.loads(l) for l in f]


@pytest.mark.slow
def test_answers_equal_offline_infer_and_the_library_is_filtered(setup, server, tmp_path):
  _, url, _ = server
  listing = httpx.get(url + '/v1/prompts').json()
  assert sorted(p['name'] for p in listing['prompts']) == ['task0', 'task1', 'task2']
  excluded = {e['name']: e['reason'] for e in listing['excluded']}
  assert 'another backbone' in excluded['foreign']
  assert 'prompt shape (7, 32)' in excluded['longer']
  rows = _offline(setup, 'task1', 'predict', str(tmp_path / 'pred'))
  texts = [r['inputs'] for r in rows]
  got = httpx.post(
      url + '/v1/generate', json={'prompt': 'task1', 'inputs': texts}, timeout=300
  ).json()
  assert [o['text'] for o in got['outputs']] == [r['prediction'] for r in rows]
  scored = _offline(setup, 'task2', 'score', str(tmp_path / 'score'))
  got = httpx.post(
      url + '/v1/score',
      json={
          'prompt': 'task2',
          'inputs': [r['inputs'] for r in scored],
          'targets': [[r['targets']] for r in scored],
      },
      timeout=300,
  ).json()
  np.testing.assert_allclose(
      [s[0] for s in got['scores']], [r['score'] for r in scored], rtol=1e-5, atol=1e-5
  )


@pytest.mark.slow
def test_library_changes_are_served_without_a_restart(setup, server):
  _, url, _ = server
  lib = setup['lib']
  lib.add('fresh', setup['prompts']['task2'], backbone=setup['frozen'])
  deadline = time.time() + 60
  while 'fresh' not in [p['name'] for p in httpx.get(url + '/v1/prompts').json()['prompts']]:
    assert time.time() < deadline, 'the new entry was not picked up'
    time.sleep(0.2)
  a = httpx.post(url + '/v1/generate', json={'prompt': 'fresh', 'inputs': ['cat rat']}, timeout=60)
  b = httpx.post(url + '/v1/generate', json={'prompt': 'task2', 'inputs': ['cat rat']}, timeout=60)
  assert a.status_code == 200 and a.json()['outputs'] == b.json()['outputs']
  lib.remove('fresh')
  deadline = time.time() + 60
  while (
      httpx.post(
          url + '/v1/generate', json={'prompt': 'fresh', 'inputs': ['cat']}, timeout=60
      ).status_code
      != 404
  ):
    assert time.time() < deadline, 'the removed entry is still served'
    time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight(setup):
  """Requests admitted before SIGTERM are answered (200) after it; none is cut off mid-way.
  Requests that had not connected yet may be refused (the server stops listening).

  The server of this test waits up to 5 s for a 256-row batch, so the admitted requests are still
  queued when the signal comes however fast the machine is (with the shared server's 8-row batches
  a fast machine answered all 24 requests before 8 were ever in flight at once)."""
  proc, url, log = _start(
      setup,
      server_lib.free_port(),
      **{
          'engine.ServingConfig.batch_buckets': '(1, 256)',
          'engine.ServingConfig.max_wait_ms': '5000.0',
      },
  )
  try:
    texts = ['cat rat mat'] * 8

    def call(i):
      try:
        r = httpx.post(
            url + '/v1/generate', json={'prompt': f'task{i % 3}', 'inputs': texts}, timeout=300
        )
        return r.status_code, time.time()
      except httpx.TransportError as e:  # Not connected / not read before the listener closed.
        return type(e).__name__, time.time()

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      futures = [pool.submit(call, i) for i in range(24)]
      deadline = time.time() + 60
      in_flight = 0
      while time.time() < deadline:
        seen = time.time()
        in_flight = httpx.get(url + '/healthz').json()['in_flight']
        if in_flight >= 8:
          break
      proc.send_signal(signal.SIGTERM)
      results = [f.result() for f in futures]
    statuses = [s for s, _ in results]
    assert in_flight >= 8, statuses
    assert all(s in (200, 503) or isinstance(s, str) for s in statuses), statuses
    # Every request in flight when SIGTERM came was answered, after the signal, with 200.
    finished_after = [t for s, t in results if s == 200 and t >= seen]
    assert len(finished_after) >= in_flight, (in_flight, statuses)
    assert proc.wait(120) == 0, open(log).read()[-3000:]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


@pytest.mark.slow
def test_two_workers_behind_one_address(setup):
  port = server_lib.free_port()
  proc, url, log = _start(setup, port, ['--workers=2'])
  try:
    pids = set()
    deadline = time.time() + 300
    while len(pids) < 2 and time.time() < deadline:
      with httpx.Client() as c:  # A new connection each time: the kernel picks a worker.
        r = c.get(url + '/healthz')
        if r.status_code == 200 and r.json()['prompts'] == 3:
          pids.add(r.json()['pid'])
    assert len(pids) == 2, (pids, open(log).read()[-3000:])
  finally:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(180) == 0, open(log).read()[-3000:]
