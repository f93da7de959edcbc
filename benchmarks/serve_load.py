"""Load test of the HTTP server on loopback, against serving one request at a time and against PEFT.

`python -m benchmarks.serve_load [--quick] [--output benchmarks/SERVING.md]`

The same random T5 1.1 (small shape by default; `--quick`: a tiny one) serves 16 prompts:

* **ours, dynamic batching**: `prompt_tuning.serving` in this process (uvicorn on 127.0.0.1),
  `--clients` concurrent HTTP clients sending `--requests` generation requests (one input each,
  lengths drawn from [16, 63] tokens plus EOS, prompts drawn from the 16), greedy decoding of
  `--decode_tokens` tokens. Throughput is requests per second of wall time; latency is per request.
* **ours, one request at a time**: the same server and requests, one client (no batching).
* **PEFT, best alternative**: `PeftModelForSeq2SeqLM` with the 16 prompts as adapters, the same
  requests grouped per prompt: one `set_adapter` + one `generate` (greedy, KV cache) per prompt, in
  a separate process (PyTorch, same threads). A request's latency is the time until its prompt's
  batch is done, counted from the start (the requests all arrive at once).

Every response of every variant is checked: the greedy tokens must equal an offline decode of the
same input with the same prompt by a one-prompt model (and PEFT's must equal ours); a request
answered with another prompt's tokens fails the run. The run is bounded by `--requests` and
`--timeout_s` and stops by itself. The machine, its load before and after, and the numbers go to
the output Markdown (and `.json`).
"""

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

import numpy as np

NUM_PROMPTS = 16
SEED = 0


class IntVocabulary:
  """Texts are space-separated token ids (the benchmark's model is random; no tokenizer needed)."""

  eos_id = 1
  unk_id = 2

  def encode(self, text: str) -> List[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids: Sequence[int]) -> str:
    return ' '.join(str(int(i)) for i in ids)


def _shapes(quick: bool) -> Dict[str, Any]:
  if quick:
    return dict(
        d_model=64,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        d_kv=16,
        vocab_size=512,
        prompt_length=4,
        lengths=(4, 12),
        buckets=(16,),
        batch_buckets=(1, 8),
    )
  return dict(
      d_model=512,
      d_ff=1024,
      num_layers=8,
      num_heads=6,
      d_kv=64,
      vocab_size=32128,
      prompt_length=20,
      lengths=(16, 63),  # + EOS: at most the 64-token bucket
      buckets=(64,),
      batch_buckets=(1, 8, 32),
  )


def _cpu() -> Dict[str, Any]:
  info = {'machine': platform.machine(), 'cpus': os.cpu_count()}
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
    for line in text.splitlines():
      if line.startswith('model name'):
        info['model'] = line.split(':', 1)[1].strip()
        break
    flags = next((l for l in text.splitlines() if l.startswith('flags')), '')
    info['flags'] = sorted(
        f for f in flags.split(':', 1)[-1].split() if f.startswith(('avx512', 'amx'))
    )
  except OSError:
    pass
  return info


def _load() -> List[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _requests(shapes, n: int) -> List[Dict[str, Any]]:
  rng = np.random.default_rng(SEED)
  out = []
  lo, hi = shapes['lengths']
  for _ in range(n):
    length = int(rng.integers(lo, hi + 1))
    ids = rng.integers(3, shapes['vocab_size'], size=length)
    out.append(
        {
            'prompt': f'task{int(rng.integers(NUM_PROMPTS))}',
            'inputs': [' '.join(str(int(i)) for i in ids)],
        }
    )
  return out


def _hf_model(workdir: str, shapes) -> str:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(SEED)
  config = transformers.T5Config(
      vocab_size=shapes['vocab_size'],
      d_model=shapes['d_model'],
      d_kv=shapes['d_kv'],
      d_ff=shapes['d_ff'],
      num_layers=shapes['num_layers'],
      num_decoder_layers=shapes['num_layers'],
      num_heads=shapes['num_heads'],
      feed_forward_proj='gated-gelu',
      tie_word_embeddings=False,
      dropout_rate=0.0,
      pad_token_id=0,
      eos_token_id=1,
      decoder_start_token_id=0,
  )
  model = transformers.T5ForConditionalGeneration(config)
  if model.lm_head.weight is model.shared.weight:
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(model.shared.weight) * config.d_model**-0.5
    )
  path = os.path.join(workdir, 'hf_t5')
  model.save_pretrained(path)
  return path


def _bank(shapes) -> np.ndarray:
  rng = np.random.default_rng(SEED + 1)
  return rng.normal(0, 0.5, (NUM_PROMPTS, shapes['prompt_length'], shapes['d_model'])).astype(
      np.float32
  )


def _trim(tokens: Sequence[int]) -> List[int]:
  out = []
  for t in tokens:
    t = int(t)
    if t == 0:
      continue
    out.append(t)
    if t == 1:
      break
  return out


# --------------------------------------------------------------------------------------- ours --


async def _clients(url, reqs, clients, timeout_s):
  import httpx  # pylint: disable=g-import-not-at-top

  latencies = [None] * len(reqs)
  outputs = [None] * len(reqs)
  queue = asyncio.Queue()
  for i in range(len(reqs)):
    queue.put_nowait(i)

  async def client(c):
    while not queue.empty():
      i = queue.get_nowait()
      start = time.perf_counter()
      r = await c.post('/v1/generate', json=reqs[i])
      latencies[i] = time.perf_counter() - start
      outputs[i] = (r.status_code, r.json())

  # One client object (creating one costs tens of ms: its TLS context), `clients` connections.
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as c:
    await c.get('/healthz')
    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*[client(c) for _ in range(clients)]), timeout_s)
    return time.perf_counter() - start, latencies, outputs


def client_worker(argv) -> None:
  """`python -m benchmarks.serve_load --client_worker SPEC.json OUT.json` (the load generator)."""
  spec_path, out_path = argv
  with open(spec_path) as f:
    spec = json.load(f)
  result = asyncio.run(_clients(spec['url'], spec['requests'], spec['clients'], spec['timeout_s']))
  with open(out_path, 'w') as f:
    json.dump(result, f)


def _client_process(url, reqs, clients, timeout_s, workdir):
  spec_path = os.path.join(workdir, 'clients_spec.json')
  out_path = os.path.join(workdir, 'clients_out.json')
  with open(spec_path, 'w') as f:
    json.dump({'url': url, 'requests': reqs, 'clients': clients, 'timeout_s': timeout_s}, f)
  subprocess.run(
      [sys.executable, '-m', 'benchmarks.serve_load', '--client_worker', spec_path, out_path],
      check=True,
      timeout=timeout_s * 2,
  )
  with open(out_path) as f:
    return tuple(json.load(f))


def _ours(args, shapes, hf_path, bank, requests, workdir) -> Dict[str, Any]:
  import httpx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import decoding, models  # pylint: disable=g-import-not-at-top
  from prompt_tuning.serving import app as app_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.serving import prompt_table  # pylint: disable=g-import-not-at-top
  from prompt_tuning.serving import server as server_lib  # pylint: disable=g-import-not-at-top

  vocab = IntVocabulary()
  config, backbone = huggingface.load_t5(hf_path)
  p = shapes['prompt_length']
  module = prompted.PromptEncoderDecoder(config, prompt_length=p, num_prompts=NUM_PROMPTS)
  model = models.EncoderDecoderModel(module, vocab, vocab)
  params = jax.tree_util.tree_map(np.asarray, dict(backbone))
  params['encoder'] = dict(params['encoder'])
  params['encoder']['prompt'] = {'prompt': {'prompt': bank}}
  cfg = engine_lib.ServingConfig(
      batch_buckets=shapes['batch_buckets'],
      input_buckets=shapes['buckets'],
      target_buckets=(8,),
      max_decode_length=args.decode_tokens,
      beam_sizes=(2,),
      max_wait_ms=args.max_wait_ms,
      max_queue=max(len(requests), 64),
      request_timeout_s=args.timeout_s,
  )
  engine = engine_lib.ServingEngine(model, params, cfg, eos_id=1)
  table = prompt_table.PromptTable(engine.capacity, engine.set_row)
  for t in range(NUM_PROMPTS):
    table.put(f'task{t}', bank[t], version='v1')
  t0 = time.perf_counter()
  engine.compile_all(kinds=('sample',))
  compile_s = time.perf_counter() - t0

  # Offline reference: each prompt's inputs decoded by a one-prompt model (no bank, no batcher).
  single = prompted.PromptEncoderDecoder(config, prompt_length=p)
  greedy = models.EncoderDecoderModel(single, vocab, vocab, decode_fn=decoding.temperature_sample)
  predict = jax.jit(
      lambda prm, b: greedy.predict_batch_with_aux(prm, b, decoder_params={'topk': 1})[0]
  )
  expected = {}
  n_in = shapes['buckets'][-1]
  for t in range(NUM_PROMPTS):
    rows = [i for i, r in enumerate(requests) if r['prompt'] == f'task{t}']
    if not rows:
      continue
    enc = np.zeros((len(rows), n_in), np.int32)
    for j, i in enumerate(rows):
      ids = vocab.encode(requests[i]['inputs'][0]) + [1]
      enc[j, : len(ids)] = ids
    prm = dict(backbone)
    prm['encoder'] = dict(prm['encoder'])
    prm['encoder']['prompt'] = {'prompt': {'prompt': bank[t]}}
    out = np.asarray(
        predict(
            prm,
            {
                'encoder_input_tokens': enc,
                'decoder_input_tokens': np.zeros((len(rows), args.decode_tokens), np.int32),
            },
        )
    )
    for j, i in enumerate(rows):
      expected[i] = _trim(out[j])

  app = app_lib.create_app(engine, table, vocab)
  results = {'compile_s': compile_s, 'functions': len(engine.keys())}
  compiles_before = engine_lib.process_compile_count()

  def load(reqs, clients):
    """Runs the clients in another process (their HTTP work must not share the server's GIL)."""
    return _client_process(url, reqs, clients, args.timeout_s, workdir)

  def check(outputs, indices):
    bad = 0
    for (status, body), i in zip(outputs, indices):
      if status != 200 or body['outputs'][0]['tokens'] != expected[i]:
        bad += 1
    return bad

  with server_lib.run_in_thread(app) as url:
    # Warm-up (connections, first batches).
    load(requests[:8], 4)
    wall, lat, outs = load(requests, args.clients)
    results['batched'] = _summary(wall, lat)
    results['batched']['wrong'] = check(outs, range(len(requests)))
    n_one = min(len(requests), args.sequential_requests)
    wall, lat, outs = load(requests[:n_one], 1)
    results['one_at_a_time'] = _summary(wall, lat)
    results['one_at_a_time']['wrong'] = check(outs, range(n_one))
    metrics = httpx.get(url + '/metrics').text
  results['compiles_during_load'] = engine_lib.process_compile_count() - compiles_before
  sums = [
      float(l.split()[-1])
      for l in metrics.splitlines()
      if l.startswith('prompt_tuning_batch_rows_sum')
  ]
  counts = [
      float(l.split()[-1])
      for l in metrics.splitlines()
      if l.startswith('prompt_tuning_batch_rows_count')
  ]
  results['mean_batch_rows'] = sum(sums) / max(sum(counts), 1)
  results['expected'] = {str(k): v for k, v in expected.items()}
  return results


def _summary(wall: float, latencies: Sequence[float]) -> Dict[str, float]:
  lat = np.asarray(latencies, np.float64)
  return {
      'requests': int(len(lat)),
      'wall_s': wall,
      'requests_per_s': len(lat) / wall,
      'p50_ms': float(np.percentile(lat, 50) * 1000),
      'p99_ms': float(np.percentile(lat, 99) * 1000),
  }


# --------------------------------------------------------------------------------------- PEFT --


def peft_worker(argv=None) -> None:
  """`python -m benchmarks.serve_load --peft_worker SPEC.json OUT.json` (a separate process)."""
  spec_path, out_path = argv
  with open(spec_path) as f:
    spec = json.load(f)
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(spec['threads'])
  bank = np.load(spec['bank'])
  base = transformers.T5ForConditionalGeneration.from_pretrained(spec['hf_path'])
  cfg = peft.PromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM,
      num_virtual_tokens=bank.shape[1],
      num_transformer_submodules=1,
  )
  model = peft.get_peft_model(base, cfg, adapter_name='task0')
  for t in range(1, NUM_PROMPTS):
    model.add_adapter(f'task{t}', cfg)
  with torch.no_grad():
    for t in range(NUM_PROMPTS):
      model.prompt_encoder[f'task{t}'].embedding.weight.copy_(torch.from_numpy(bank[t]))
  model.eval()
  requests = spec['requests']
  vocab = IntVocabulary()

  def run():
    done_at = [None] * len(requests)
    tokens = [None] * len(requests)
    start = time.perf_counter()
    with torch.inference_mode():
      for t in range(NUM_PROMPTS):
        rows = [i for i, r in enumerate(requests) if r['prompt'] == f'task{t}']
        if not rows:
          continue
        ids = [vocab.encode(requests[i]['inputs'][0]) + [1] for i in rows]
        n = max(len(x) for x in ids)
        enc = torch.zeros((len(rows), n), dtype=torch.long)
        for j, x in enumerate(ids):
          enc[j, : len(x)] = torch.tensor(x)
        model.set_adapter(f'task{t}')
        out = model.generate(
            input_ids=enc,
            attention_mask=(enc > 0).long(),
            max_new_tokens=spec['decode_tokens'],
            do_sample=False,
            num_beams=1,
            use_cache=True,
        )
        now = time.perf_counter() - start
        for j, i in enumerate(rows):
          done_at[i] = now
          tokens[i] = _trim(out[j, 1:].tolist())
    return time.perf_counter() - start, done_at, tokens

  run()  # Warm-up.
  wall, lat, tokens = run()
  with open(out_path, 'w') as f:
    json.dump({'summary': _summary(wall, lat), 'tokens': tokens}, f)


def _peft(args, shapes, hf_path, bank, requests, workdir) -> Dict[str, Any]:
  bank_path = os.path.join(workdir, 'bank.npy')
  np.save(bank_path, bank)
  spec = {
      'hf_path': hf_path,
      'bank': bank_path,
      'requests': requests,
      'decode_tokens': args.decode_tokens,
      'threads': args.threads,
  }
  spec_path, out_path = os.path.join(workdir, 'peft_spec.json'), os.path.join(workdir, 'peft.json')
  with open(spec_path, 'w') as f:
    json.dump(spec, f)
  env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
  subprocess.run(
      [sys.executable, '-m', 'benchmarks.serve_load', '--peft_worker', spec_path, out_path],
      check=True,
      env=env,
      timeout=args.timeout_s * 4,
  )
  with open(out_path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------- report --


def _report(args, results) -> str:
  ours, peft_res = results['ours'], results['peft']
  b, one, pf = ours['batched'], ours['one_at_a_time'], peft_res['summary']
  rows = [
      ('ours, dynamic mixed-task batching', b),
      ('ours, one request at a time', one),
      ('PEFT, one set_adapter + generate per prompt', pf),
  ]
  lines = [
      '## Serving load test (loopback HTTP, 16 prompts)',
      '',
      f'`python -m benchmarks.serve_load{" --quick" if args.quick else ""}`: {args.requests} '
      f'generation requests ({args.clients} concurrent clients), greedy, {args.decode_tokens} tokens, '
      f'{results["shapes"]}. CPU: {results["cpu"].get("model")} ({results["cpu"].get("cpus")} '
      f'cores; {" ".join(results["cpu"].get("flags", []))}); load average before '
      f'{results["load_before"]}, after {results["load_after"]}.',
      '',
      '| variant | requests | requests/s | p50 latency ms | p99 latency ms | wrong answers |',
      '|---|---|---|---|---|---|',
  ]
  for name, r in rows:
    lines.append(
        f'| {name} | {r["requests"]} | {r["requests_per_s"]:.2f} | {r["p50_ms"]:.0f} | '
        f'{r["p99_ms"]:.0f} | {r.get("wrong", results["peft_wrong"])} |'
    )
  lines += [
      '',
      f'Batched / one at a time: {b["requests_per_s"] / one["requests_per_s"]:.2f}x throughput; '
      f'batched / PEFT: {b["requests_per_s"] / pf["requests_per_s"]:.2f}x. Mean rows per batch '
      f'{ours["mean_batch_rows"]:.1f}; {ours["functions"]} functions compiled at start-up in '
      f'{ours["compile_s"]:.1f} s, {ours["compiles_during_load"]} compilations during the load.',
      "Every answer was checked against an offline decode with the same prompt; PEFT's tokens "
      'against ours.',
      '',
  ]
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--requests', type=int, default=None)
  parser.add_argument('--sequential_requests', type=int, default=None)
  parser.add_argument('--clients', type=int, default=32)
  parser.add_argument('--decode_tokens', type=int, default=8)
  parser.add_argument('--max_wait_ms', type=float, default=10.0)
  parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--timeout_s', type=float, default=600.0)
  parser.add_argument('--output', default=None)
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--peft_worker', nargs=2, default=None)
  parser.add_argument('--client_worker', nargs=2, default=None)
  args = parser.parse_args(argv)
  if args.client_worker:
    client_worker(args.client_worker)
    return 0
  if args.peft_worker:
    peft_worker(args.peft_worker)
    return 0
  shapes = _shapes(args.quick)
  args.requests = args.requests or (32 if args.quick else 256)
  args.sequential_requests = args.sequential_requests or (8 if args.quick else 48)
  workdir = args.workdir or tempfile.mkdtemp(prefix='serve_load_')
  os.makedirs(workdir, exist_ok=True)
  results = {
      'cpu': _cpu(),
      'load_before': _load(),
      'shapes': {k: v for k, v in shapes.items() if k != 'lengths'},
  }
  hf_path = _hf_model(workdir, shapes)
  bank = _bank(shapes)
  requests = _requests(shapes, args.requests)
  results['ours'] = _ours(args, shapes, hf_path, bank, requests, workdir)
  results['peft'] = _peft(args, shapes, hf_path, bank, requests, workdir)
  expected = results['ours'].pop('expected')
  results['peft_wrong'] = sum(
      1 for i, toks in enumerate(results['peft']['tokens']) if toks != expected[str(i)]
  )
  results['load_after'] = _load()
  report = _report(args, results)
  print(report)
  if args.output:
    with open(args.output, 'w') as f:
      f.write(report)
    with open(os.path.splitext(args.output)[0] + '.json', 'w') as f:
      json.dump({k: v for k, v in results.items() if k != 'peft' or True}, f, indent=1, default=str)
  wrong = results['ours']['batched']['wrong'] + results['ours']['one_at_a_time']['wrong']
  return 1 if wrong else 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # as the entry points (PROMPT_TUNING_MALLOC set: one restart)
  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  sys.exit(main())
