"""The ASGI app (FastAPI): generation and scoring for many prompts through one frozen model.

Endpoints:

* `POST /v1/generate` `{"prompt": NAME, "inputs": [TEXT, ...], "method": "greedy" | "sample" |
  "beam", "temperature": 1.0, "beam_size": 4, "seed": 0, "truncate": false, "timeout_s": null}`
  -> `{"prompt": NAME, "outputs": [{"text", "tokens", "score"}, ...]}`.
* `POST /v1/score` `{"prompt": NAME, "inputs": [TEXT, ...], "candidates": [TEXT, ...]}` (or
  `"targets": [[TEXT, ...], ...]`, one candidate list per input) -> `{"scores": [[log-likelihood of
  each candidate] per input], "best": [index per input]}`: rank classification, the way the paper's
  tasks are scored.
* `GET /v1/prompts`: the prompts served (name, bank row, version, metadata) and the library entries
  left out (another backbone, another prompt shape) with the reason.
* `GET /healthz`; `GET /metrics` (Prometheus text format: requests, batch sizes, queue depth,
  latency histograms, compile count).

Errors: an unknown prompt is 404; an input longer than the largest input bucket is 413 unless the
request asks to `truncate`; a malformed body is 422 with the offending field; an unknown decoding
option is 400; a full queue is 503 with `Retry-After`; a request not answered in time is 504; a
server shutting down answers 503. None of them affects the other requests.
"""

import asyncio
import contextlib
import os
import time
from typing import Any, Callable, Dict, List, Literal, Optional

import fastapi
from fastapi import responses
import prometheus_client
import pydantic

from prompt_tuning.serving import batcher as batcher_lib
from prompt_tuning.serving import engine as engine_lib
from prompt_tuning.serving import prompt_table as table_lib


class GenerateRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='forbid')

  prompt: str
  inputs: List[str] = pydantic.Field(min_length=1)
  method: Literal['greedy', 'sample', 'beam'] = 'greedy'
  temperature: float = pydantic.Field(1.0, ge=0.0)
  beam_size: int = pydantic.Field(4, ge=1)
  seed: int = 0
  truncate: bool = False
  timeout_s: Optional[float] = pydantic.Field(None, gt=0)


class ScoreRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra='forbid')

  prompt: str
  inputs: List[str] = pydantic.Field(min_length=1)
  candidates: Optional[List[str]] = None
  targets: Optional[List[List[str]]] = None
  truncate: bool = False
  timeout_s: Optional[float] = pydantic.Field(None, gt=0)

  @pydantic.model_validator(mode='after')
  def _one_candidate_source(self):
    if (self.candidates is None) == (self.targets is None):
      raise ValueError(
          'give exactly one of `candidates` (shared) or `targets` (one list per input)'
      )
    if self.targets is not None and len(self.targets) != len(self.inputs):
      raise ValueError(f'`targets` has {len(self.targets)} lists for {len(self.inputs)} inputs')
    lists = [self.candidates] if self.candidates is not None else self.targets
    if any(not c for c in lists):
      raise ValueError('every input needs at least one candidate target')
    return self


class HttpError(Exception):

  def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None):
    super().__init__(message)
    self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
  """The server's Prometheus metrics (one registry per app)."""

  def __init__(self, queue_depth: Callable[[], int], prompts: Callable[[], int]):
    r = self.registry = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
        'prompt_tuning_requests',
        'Requests by endpoint and status.',
        ['endpoint', 'status'],
        registry=r,
    )
    self.latency = prometheus_client.Histogram(
        'prompt_tuning_request_latency_seconds',
        'Request latency.',
        ['endpoint'],
        registry=r,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )
    self.batch_rows = prometheus_client.Histogram(
        'prompt_tuning_batch_rows',
        'Rows per executed batch.',
        ['kind'],
        registry=r,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    )
    self.batch_seconds = prometheus_client.Histogram(
        'prompt_tuning_batch_seconds',
        'Device time per batch.',
        ['kind'],
        registry=r,
    )
    gauge = prometheus_client.Gauge(
        'prompt_tuning_queue_depth', 'Rows admitted and not yet answered.', registry=r
    )
    gauge.set_function(queue_depth)
    compiles = prometheus_client.Gauge(
        'prompt_tuning_compiles',
        'XLA compilations in this process (flat while serving).',
        registry=r,
    )
    compiles.set_function(engine_lib.process_compile_count)
    served = prometheus_client.Gauge('prompt_tuning_prompts', 'Prompts served.', registry=r)
    served.set_function(prompts)

  def on_batch(self, kind: str, rows: int, seconds: float) -> None:
    self.batch_rows.labels(kind).observe(rows)
    self.batch_seconds.labels(kind).observe(seconds)


def create_app(
    engine: engine_lib.ServingEngine,
    table: table_lib.PromptTable,
    vocabulary: Any,
    *,
    sync_prompts: Optional[Callable[[], Dict[str, Any]]] = None,
    excluded: Optional[Callable[[], List[Dict[str, Any]]]] = None,
) -> fastapi.FastAPI:
  """The app serving `engine` with the prompts of `table`.

  Args:
    engine: the compiled engine (`compile_all` already called).
    table: names -> bank rows.
    vocabulary: a seqio vocabulary (`encode`, `decode`, `eos_id`) for inputs and outputs.
    sync_prompts: called every `poll_interval_s` (and at start) on a worker thread to bring
      `table` up to date with the prompt library (hot reload); returns a summary.
    excluded: library entries that are not served, with reasons (for `GET /v1/prompts`).
  """
  config = engine.config
  state: Dict[str, Any] = {}
  metrics = Metrics(
      lambda: state['batcher'].queue_depth if 'batcher' in state else 0, lambda: len(table.names())
  )

  async def poll_prompts():
    loop = asyncio.get_running_loop()
    while True:
      try:
        await loop.run_in_executor(None, sync_prompts)
      except Exception as e:  # pylint: disable=broad-except
        state['last_sync_error'] = f'{type(e).__name__}: {e}'
      await asyncio.sleep(config.poll_interval_s)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    del app
    b = batcher_lib.DynamicBatcher(
        engine,
        max_batch_size=config.max_batch_size,
        max_wait_ms=config.max_wait_ms,
        max_queue=config.max_queue,
        on_batch=metrics.on_batch,
    )
    b.start()
    state['batcher'] = b
    poller = asyncio.get_running_loop().create_task(poll_prompts()) if sync_prompts else None
    try:
      yield
    finally:
      if poller is not None:
        poller.cancel()
      # SIGTERM: uvicorn stops accepting connections and waits for the open requests; the
      # batcher then answers every row it admitted before the process exits.
      await b.drain()

  app = fastapi.FastAPI(title='prompt_tuning server', lifespan=lifespan)

  @app.exception_handler(HttpError)
  async def _http_error(request, exc: HttpError):
    del request
    return responses.JSONResponse(
        {'error': exc.message}, status_code=exc.status, headers=exc.headers
    )

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation_error(request, exc):
    del request
    problems = '; '.join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in exc.errors()
    )
    return responses.JSONResponse({'error': f'Malformed request: {problems}'}, status_code=422)

  def encode(text: str, truncate: bool, what: str) -> List[int]:
    ids = list(vocabulary.encode(text))
    limit = config.input_buckets[-1] if what == 'input' else config.target_buckets[-1]
    if len(ids) + 1 > limit:
      if not truncate:
        raise HttpError(
            413,
            f'The {what} {text[:40]!r}... has {len(ids) + 1} tokens (with EOS), more than the '
            f'{limit} this server accepts; shorten it or send "truncate": true.',
        )
      ids = ids[: limit - 1]
    return ids + [vocabulary.eos_id]

  def decode(tokens: List[int]) -> str:
    if vocabulary.eos_id in tokens:
      tokens = tokens[: tokens.index(vocabulary.eos_id)]
    return vocabulary.decode([t for t in tokens if t > 0])

  async def run_rows(endpoint: str, name: str, make_rows, timeout: Optional[float]):
    try:
      row = table.acquire(name)
    except table_lib.UnknownPromptError:
      raise HttpError(
          404, f'Unknown prompt {name!r}; GET /v1/prompts lists the {len(table.names())} served.'
      ) from None
    state['in_flight'] = state.get('in_flight', 0) + 1
    try:
      rows = make_rows(row)
      try:
        futures = state['batcher'].submit(rows)
      except batcher_lib.QueueFullError as e:
        raise HttpError(503, str(e), {'Retry-After': '1'}) from None
      except batcher_lib.DrainingError as e:
        raise HttpError(503, str(e), {'Retry-After': '1'}) from None
      try:
        return await asyncio.wait_for(asyncio.gather(*futures), timeout or config.request_timeout_s)
      except asyncio.TimeoutError:
        for f in futures:
          f.cancel()
        raise HttpError(
            504, f'The request was not answered within {timeout or config.request_timeout_s} s.'
        ) from None
    finally:
      table.release(row)
      state['in_flight'] -= 1

  async def timed(endpoint: str, fn):
    start = time.monotonic()
    status = 200
    try:
      return await fn()
    except HttpError as e:
      status = e.status
      raise
    except ValueError as e:  # The engine refuses a shape or option: the request's fault.
      status = 400
      raise HttpError(400, str(e)) from None
    finally:
      metrics.requests.labels(endpoint, str(status)).inc()
      metrics.latency.labels(endpoint).observe(time.monotonic() - start)

  @app.post('/v1/generate')
  async def generate(req: GenerateRequest):
    group = ('beam', req.beam_size) if req.method == 'beam' else ('sample',)
    temperature = req.temperature if req.method == 'sample' else 0.0

    async def run():
      if req.method == 'beam' and req.beam_size not in config.beam_sizes:
        raise HttpError(
            400,
            f'beam_size {req.beam_size} is not served; this server compiled '
            f'{list(config.beam_sizes)}.',
        )
      token_rows = [encode(t, req.truncate, 'input') for t in req.inputs]

      def make_rows(row):
        return [
            batcher_lib.Row(
                group=group, tokens=t, prompt_row=row, temperature=temperature, seed=req.seed
            )
            for t in token_rows
        ]

      results = await run_rows('generate', req.prompt, make_rows, req.timeout_s)
      return {
          'prompt': req.prompt,
          'outputs': [
              {'text': decode(tokens), 'tokens': _trim(tokens, vocabulary.eos_id), 'score': score}
              for tokens, score in results
          ],
      }

    return await timed('generate', run)

  @app.post('/v1/score')
  async def score(req: ScoreRequest):
    per_input = [req.candidates] * len(req.inputs) if req.candidates is not None else req.targets

    async def run():
      token_rows = [encode(t, req.truncate, 'input') for t in req.inputs]
      target_rows = [[encode(c, req.truncate, 'target') for c in cands] for cands in per_input]

      def make_rows(row):
        return [
            batcher_lib.Row(group=('score',), tokens=tokens, target=target, prompt_row=row)
            for tokens, targets in zip(token_rows, target_rows)
            for target in targets
        ]

      flat = await run_rows('score', req.prompt, make_rows, req.timeout_s)
      scores, i = [], 0
      for cands in per_input:
        scores.append(list(flat[i : i + len(cands)]))
        i += len(cands)
      return {'scores': scores, 'best': [max(range(len(s)), key=s.__getitem__) for s in scores]}

    return await timed('score', run)

  @app.get('/v1/prompts')
  async def prompts():
    return {
        'prompts': table.describe(),
        'excluded': excluded() if excluded else [],
        'capacity': table.capacity,
        'prompt_shape': [engine.prompt_length, engine.embed_dim],
        'last_sync_error': state.get('last_sync_error'),
    }

  @app.get('/healthz')
  async def healthz():
    b = state.get('batcher')
    return {
        'status': 'ok',
        'prompts': len(table.names()),
        'queue_depth': b.queue_depth if b else 0,
        'in_flight': state.get('in_flight', 0),
        'pid': os.getpid(),
    }

  @app.get('/metrics')
  async def prometheus_metrics():
    return responses.Response(
        prometheus_client.generate_latest(metrics.registry),
        media_type=prometheus_client.CONTENT_TYPE_LATEST,
    )

  app.state.metrics = metrics
  app.state.serving = state
  return app


def _trim(tokens: List[int], eos_id: int) -> List[int]:
  """The decoded ids up to and including EOS."""
  out = []
  for t in tokens:
    if t == 0 and not out:
      continue
    out.append(int(t))
    if t == eos_id:
      break
  return [t for t in out if t > 0]
