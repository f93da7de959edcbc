"""The HTTP server on a tiny model: answers equal offline decoding/scoring whatever the batch mix,
no recompilation under load, clear 4xx errors, back-pressure, hot prompts.

References are independent of the serving path: each example decoded and scored alone by a
one-prompt model (no bank, no buckets, no batcher).
"""

import asyncio
import threading
import time

import httpx
import jax
import numpy as np
import pytest

import serving_testlib as st
from prompt_tuning.serving import app as app_lib
from prompt_tuning.serving import engine as engine_lib
from prompt_tuning.serving import prompt_table as table_lib

TEXTS = ['cat', 'rat mat hat', 'tea ten sea', 'melon', 'lemon salad wind', 'rain rain cat mat']
CANDIDATES = ['one', 'two', 'three']
CONFIG = engine_lib.ServingConfig(
    batch_buckets=(1, 8),
    input_buckets=(32,),
    target_buckets=(8,),
    max_decode_length=6,
    beam_sizes=(2,),
    max_wait_ms=20.0,
    max_queue=64,
    poll_interval_s=0.2,
)


@pytest.fixture(scope='module')
def served():
  vocab = st.vocabulary()
  backbone = st.backbone_params()
  engine = st.engine(12, vocab, CONFIG, backbone)
  table = table_lib.PromptTable(engine.capacity, engine.set_row)
  prompts = st.prompts(6)
  for name, value in prompts.items():
    table.put(name, value, version='v1')
  engine.compile_all()
  app = app_lib.create_app(engine, table, vocab)
  with st.running(app) as url:
    yield {
        'url': url,
        'engine': engine,
        'table': table,
        'vocab': vocab,
        'backbone': backbone,
        'prompts': prompts,
        'app': app,
    }


@pytest.fixture(scope='module')
def reference(served):
  """Greedy decodes and candidate scores of each (prompt, text), each example alone."""
  vocab = served['vocab']
  out = {}
  for name, prompt in served['prompts'].items():
    params, greedy, score = st.single_prompt_reference(vocab, served['backbone'], prompt)
    for text in TEXTS:
      enc = np.zeros((1, 32), np.int32)
      ids = list(vocab.encode(text)) + [1]
      enc[0, : len(ids)] = ids
      dec = np.zeros((1, CONFIG.max_decode_length), np.int32)
      tokens, aux = greedy(params, {'encoder_input_tokens': enc, 'decoder_input_tokens': dec})
      scores = []
      for cand in CANDIDATES:
        tgt = np.zeros((1, 8), np.int32)
        t = list(vocab.encode(cand)) + [1]
        tgt[0, : len(t)] = t
        batch = {
            'encoder_input_tokens': enc,
            'decoder_input_tokens': np.concatenate([np.zeros((1, 1), np.int32), tgt[:, :-1]], 1),
            'decoder_target_tokens': tgt,
            'decoder_loss_weights': (tgt > 0).astype(np.float32),
        }
        scores.append(float(score(params, batch)[0]))
      out[name, text] = (app_lib._trim(np.asarray(tokens)[0].tolist(), 1), scores)  # pylint: disable=protected-access
  return out


async def _mixed_load(url, requests, concurrency=12):
  """Sends `requests` [(endpoint, body)] with `concurrency` clients; returns [(status, json)]."""
  out = [None] * len(requests)
  queue = asyncio.Queue()
  for i, r in enumerate(requests):
    queue.put_nowait((i, r))

  async def client():
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
      while not queue.empty():
        i, (endpoint, body) = queue.get_nowait()
        r = await c.post(endpoint, json=body)
        out[i] = (r.status_code, r.json(), dict(r.headers))

  await asyncio.gather(*[client() for _ in range(concurrency)])
  return out


def _requests(names, n, seed=0):
  rng = np.random.default_rng(seed)
  reqs = []
  for _ in range(n):
    name = names[int(rng.integers(len(names)))]
    texts = [TEXTS[int(i)] for i in rng.integers(len(TEXTS), size=int(rng.integers(1, 3)))]
    if rng.random() < 0.5:
      reqs.append(('/v1/generate', {'prompt': name, 'inputs': texts}))
    else:
      reqs.append(('/v1/score', {'prompt': name, 'inputs': texts, 'candidates': CANDIDATES}))
  return reqs


def _check(req, status, body, reference):
  endpoint, payload = req
  assert status == 200, body
  for i, text in enumerate(payload['inputs']):
    tokens, scores = reference[payload['prompt'], text]
    if endpoint == '/v1/generate':
      assert body['outputs'][i]['tokens'] == tokens, (payload, body)
    else:
      np.testing.assert_allclose(body['scores'][i], scores, rtol=1e-5, atol=1e-5)
      assert body['best'][i] == int(np.argmax(scores))


def test_mixed_task_answers_equal_offline_and_nothing_recompiles(served, reference):
  compiles = engine_lib.process_compile_count()
  reqs = _requests(sorted(served['prompts']), 60)
  results = asyncio.run(_mixed_load(served['url'], reqs))
  for req, (status, body, _) in zip(reqs, results):
    _check(req, status, body, reference)
  assert engine_lib.process_compile_count() == compiles
  metrics = httpx.get(served['url'] + '/metrics').text
  # Batches really mixed rows (more than one row per batch on average).
  rows = sum(
      float(l.split()[-1])
      for l in metrics.splitlines()
      if l.startswith('prompt_tuning_batch_rows_sum')
  )
  batches = sum(
      float(l.split()[-1])
      for l in metrics.splitlines()
      if l.startswith('prompt_tuning_batch_rows_count')
  )
  assert rows / batches > 1.5, metrics
  assert 'prompt_tuning_compiles' in metrics and 'prompt_tuning_queue_depth' in metrics
  assert 'prompt_tuning_request_latency_seconds_bucket' in metrics


def test_decoding_options(served, reference):
  url = served['url']
  beam = httpx.post(
      url + '/v1/generate',
      json={'prompt': 'task0', 'inputs': TEXTS[:2], 'method': 'beam', 'beam_size': 2},
      timeout=60,
  )
  assert beam.status_code == 200 and len(beam.json()['outputs']) == 2
  a = httpx.post(
      url + '/v1/generate',
      json={
          'prompt': 'task1',
          'inputs': TEXTS[:3],
          'method': 'sample',
          'temperature': 1.5,
          'seed': 3,
      },
      timeout=60,
  ).json()
  b = httpx.post(
      url + '/v1/generate',
      json={
          'prompt': 'task1',
          'inputs': TEXTS[:3],
          'method': 'sample',
          'temperature': 1.5,
          'seed': 3,
      },
      timeout=60,
  ).json()
  assert a == b  # Seeded.
  zero = httpx.post(
      url + '/v1/generate',
      json={'prompt': 'task1', 'inputs': TEXTS[:3], 'method': 'sample', 'temperature': 0.0},
      timeout=60,
  ).json()
  assert [o['tokens'] for o in zero['outputs']] == [reference['task1', t][0] for t in TEXTS[:3]]


@pytest.mark.parametrize(
    'body,status,fragment',
    [
        ({'prompt': 'nope', 'inputs': ['cat']}, 404, "Unknown prompt 'nope'"),
        ({'prompt': 'task0', 'inputs': ['cat ' * 40]}, 413, 'truncate'),
        ({'prompt': 'task0', 'inputs': []}, 422, 'inputs'),
        ({'prompt': 'task0'}, 422, 'inputs'),
        ({'prompt': 'task0', 'inputs': ['cat'], 'colour': 'red'}, 422, 'colour'),
        (
            {'prompt': 'task0', 'inputs': ['cat'], 'method': 'beam', 'beam_size': 3},
            400,
            'beam_size 3',
        ),
    ],
)
def test_bad_requests_get_clear_4xx_and_leave_the_server_healthy(served, body, status, fragment):
  r = httpx.post(served['url'] + '/v1/generate', json=body, timeout=60)
  assert r.status_code == status, r.text
  assert fragment in r.json()['error']
  assert httpx.get(served['url'] + '/healthz').json()['status'] == 'ok'
  ok = httpx.post(
      served['url'] + '/v1/generate', json={'prompt': 'task0', 'inputs': ['cat']}, timeout=60
  )
  assert ok.status_code == 200


def test_truncation_on_request(served):
  r = httpx.post(
      served['url'] + '/v1/generate',
      json={'prompt': 'task0', 'inputs': ['cat ' * 40], 'truncate': True},
      timeout=60,
  )
  assert r.status_code == 200
  bad = httpx.post(
      served['url'] + '/v1/score', json={'prompt': 'task0', 'inputs': ['cat']}, timeout=60
  )
  assert bad.status_code == 422 and 'candidates' in bad.json()['error']


def test_overload_gets_503_and_every_admitted_request_is_right(reference):
  """A queue of 4 rows and 40 concurrent clients: some 503 + Retry-After, the rest correct."""
  vocab = st.vocabulary()
  small = engine_lib.ServingConfig(
      batch_buckets=(1, 8),
      input_buckets=(32,),
      target_buckets=(8,),
      max_decode_length=6,
      beam_sizes=(2,),
      max_wait_ms=50.0,
      max_queue=4,
  )
  engine = st.engine(8, vocab, small, st.backbone_params())
  table = table_lib.PromptTable(engine.capacity, engine.set_row)
  for name, value in st.prompts(6).items():
    table.put(name, value, version='v1')
  engine.compile_all(kinds=('sample',))
  app = app_lib.create_app(engine, table, vocab)
  import psutil  # pylint: disable=g-import-not-at-top

  proc = psutil.Process()
  with st.running(app) as url:
    rss = []
    for round_ in range(3):
      reqs = [
          ('/v1/generate', {'prompt': f'task{i % 6}', 'inputs': [TEXTS[i % 6]]}) for i in range(40)
      ]
      results = asyncio.run(_mixed_load(url, reqs, concurrency=40))
      refused = [r for r in results if r[0] == 503]
      assert refused, 'the queue never filled'
      assert all(r[2].get('retry-after') == '1' for r in refused)
      for req, (status, body, _) in zip(reqs, results):
        if status != 503:
          _check(req, status, body, reference)
      assert httpx.get(url + '/healthz').json()['queue_depth'] == 0
      rss.append(proc.memory_info().rss)
    # Memory flat afterwards: the third overload round does not grow the process.
    assert rss[2] - rss[1] < 30 * 2**20, rss


def test_hot_reload_adds_replaces_and_removes_without_misrouting(served, reference):
  url, table = served['url'], served['table']
  prompts = served['prompts']
  # A new prompt (task0's values under a new name) is served from the next batch on.
  table.put('late', prompts['task0'], version='v1')
  r = httpx.post(url + '/v1/generate', json={'prompt': 'late', 'inputs': TEXTS[:2]}, timeout=60)
  assert [o['tokens'] for o in r.json()['outputs']] == [reference['task0', t][0] for t in TEXTS[:2]]

  # Removal under load: in-flight requests for the removed prompt finish with its old value;
  # requests after the removal get 404; the other prompts are never mis-routed.
  stop = threading.Event()

  def remove_soon():
    time.sleep(0.3)
    table.remove('late')
    stop.set()

  reqs = [
      ('/v1/generate', {'prompt': 'late' if i % 2 else 'task2', 'inputs': [TEXTS[i % 6]]})
      for i in range(40)
  ]
  remover = threading.Thread(target=remove_soon)
  remover.start()
  results = asyncio.run(_mixed_load(url, reqs, concurrency=8))
  remover.join()
  statuses = []
  for (endpoint, body), (status, out, _) in zip(reqs, results):
    statuses.append(status)
    if status == 200:
      ref = 'task0' if body['prompt'] == 'late' else 'task2'
      assert out['outputs'][0]['tokens'] == reference[ref, body['inputs'][0]][0]
    else:
      assert status == 404 and body['prompt'] == 'late'
  assert 404 in statuses and 200 in statuses
  # Replacing task5 with task3's values: new requests get the new value.
  table.put('task5', prompts['task3'], version='v2')
  r = httpx.post(url + '/v1/generate', json={'prompt': 'task5', 'inputs': TEXTS[:2]}, timeout=60)
  assert [o['tokens'] for o in r.json()['outputs']] == [reference['task3', t][0] for t in TEXTS[:2]]
  table.put('task5', prompts['task5'], version='v3')
  names = [p['name'] for p in httpx.get(url + '/v1/prompts').json()['prompts']]
  assert 'late' not in names and 'task5' in names
