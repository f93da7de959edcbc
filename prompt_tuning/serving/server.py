"""`python -m prompt_tuning.serve`: the frozen backbone, every compatible library prompt, one server.

`serve(...)` (gin: `serve_script.serve`, see `configs/runs/serve.gin`) restores the frozen model from
`CHECKPOINT_PATH` (any format `checkpoints.formats.load_params` reads), builds the engine with a
prompt bank of `NUM_PROMPTS` rows, loads every prompt of the library (`--library`) trained on this
backbone (same fingerprint) with the served prompt shape, compiles every bucket, and runs uvicorn.

The library is watched (`ServingConfig.poll_interval_s`): an entry added, replaced or removed while
serving is picked up without a restart (`LibrarySync`); in-flight requests keep the prompt they were
admitted with (`prompt_table.PromptTable`). Entries of another backbone or another prompt shape are
not served and are listed with the reason in `GET /v1/prompts`.

Scale-out: `--workers N` runs N uvicorn worker processes behind one address (uvicorn's process
manager shares the listening socket; each worker loads the model and compiles once). Put each on
its own accelerator by starting one server per device with `CUDA_VISIBLE_DEVICES` /
`TPU_VISIBLE_CHIPS` and different ports behind your load balancer, or use Ray Serve; see the
README's "Serving" section.
"""

import contextlib
import hashlib
import os
import signal
import threading
from typing import Any, Dict, List, Optional

from absl import logging
import jax
import numpy as np

from prompt_tuning.serving import engine as engine_lib
from prompt_tuning.serving import prompt_table as table_lib


class LibrarySync:
  """Brings a `PromptTable` up to date with a prompt library (call it; cheap when unchanged).

  Args:
    library_dir: the library.
    table: the served names -> bank rows.
    fingerprint: the served backbone's `library.Fingerprint`.
    prompt_shape: `(P, H)` the server's bank holds.
  """

  def __init__(self, library_dir: str, table: table_lib.PromptTable, fingerprint, prompt_shape):
    from prompt_tuning import library  # pylint: disable=g-import-not-at-top

    self._library = library.Library(library_dir)
    self._table = table
    self._fingerprint = fingerprint
    self._shape = tuple(prompt_shape)
    self._version = None
    self._lock = threading.Lock()
    self.excluded: List[Dict[str, Any]] = []

  def __call__(self) -> Dict[str, Any]:
    with self._lock:
      version = self._library.version() if self._library.exists() else 0
      if version == self._version:
        return {'version': version, 'changed': False}
      served, excluded = {}, []
      for info in self._library.list():
        reason = None
        if info.fingerprint != self._fingerprint:
          reason = (
              f'trained on another backbone ({info.fingerprint}); this server serves '
              f'{self._fingerprint}'
          )
        elif tuple(info.shape) != self._shape:
          reason = (
              f'prompt shape {tuple(info.shape)}; this server serves {self._shape} '
              '(PROMPT_LENGTH, embed dim)'
          )
        if reason:
          excluded.append({'name': info.name, 'reason': reason})
          continue
        try:
          entry = self._library.get(info.name)
        except Exception as e:  # pylint: disable=broad-except
          excluded.append({'name': info.name, 'reason': f'unreadable: {e}'})
          continue
        array = np.asarray(entry.array, np.float32)
        if not np.all(np.isfinite(array)):
          excluded.append({'name': info.name, 'reason': 'not finite (NaN or Inf values)'})
          continue
        digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        served[info.name] = (array, digest, dict(info.metadata))
      for name in set(self._table.names()) - set(served):
        self._table.remove(name)
      for name, (array, digest, metadata) in served.items():
        meta = {k: metadata[k] for k in ('task', 'method') if k in metadata}
        self._table.put(name, array, version=digest, metadata=meta)
      self.excluded = excluded
      self._version = version
      logging.info(
          'Prompt library version %s: serving %d prompts, %d left out.',
          version,
          len(served),
          len(excluded),
      )
      return {'version': version, 'changed': True, 'served': len(served), 'excluded': len(excluded)}


def build_app(
    *,
    model,
    restore_checkpoint_cfg,
    config: engine_lib.ServingConfig,
    library_dir: Optional[str],
    compile_kinds=('sample', 'beam', 'score'),
):
  """The ASGI app: restores the model, loads the library, compiles every bucket."""
  from prompt_tuning import library  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_tuning.serving import app as app_lib  # pylint: disable=g-import-not-at-top

  if not library_dir:
    raise ValueError(
        'No prompt library: pass --library=DIR (a directory made by '
        '`python -m prompt_tuning.library add`).'
    )
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  params, _ = eval_lib.restore_params(model, restore_checkpoint_cfg, partitioner, batch_size=1)
  params = jax.device_get(params)
  vocab = model.output_vocabulary
  engine = engine_lib.ServingEngine(model, params, config, eos_id=vocab.eos_id)
  table = table_lib.PromptTable(engine.capacity, engine.set_row)
  sync = LibrarySync(
      library_dir,
      table,
      library.backbone_fingerprint(params),
      (engine.prompt_length, engine.embed_dim),
  )
  sync()
  n = engine.compile_all(compile_kinds)
  logging.info('Compiled %d functions; serving %d prompts.', n, len(table.names()))
  return app_lib.create_app(engine, table, vocab, sync_prompts=sync, excluded=lambda: sync.excluded)


def free_port(host: str = '127.0.0.1') -> int:
  """A port nobody listens on now (for tests and notebooks)."""
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def run_in_thread(
    app, host: str = '127.0.0.1', port: Optional[int] = None, start_timeout_s: float = 120.0
):
  """Runs `app` with uvicorn in a background thread (tests, notebooks, benchmarks); yields its URL
  and stops it (finishing open requests) on exit."""
  import time  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top

  port = port or free_port(host)
  server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level='warning'))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + start_timeout_s
  while not server.started:
    if time.time() > deadline or not thread.is_alive():
      raise RuntimeError(f'The server did not start on {host}:{port}.')
    time.sleep(0.05)
  try:
    yield f'http://{host}:{port}'
  finally:
    server.should_exit = True
    thread.join(60)


def listening_socket(host: str, port: int):
  """A TCP socket bound with `SO_REUSEPORT`: several server processes share one address and the
  kernel spreads the connections over them (the `--workers` scale-out)."""
  import socket  # pylint: disable=g-import-not-at-top

  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  sock.bind((host, port))
  sock.set_inheritable(True)
  return sock


def serve(
    *,
    model,
    restore_checkpoint_cfg,
    config: engine_lib.ServingConfig = engine_lib.ServingConfig(),
    library_dir: Optional[str] = None,
    host: str = '127.0.0.1',
    port: int = 8000,
):
  """Runs one server process (blocks until SIGTERM / Ctrl-C, then finishes in-flight requests).

  The socket is bound with `SO_REUSEPORT`, so `--workers N` (see `prompt_tuning/serve.py`) runs N
  such processes behind one address.
  """
  import uvicorn  # pylint: disable=g-import-not-at-top

  app = build_app(
      model=model,
      restore_checkpoint_cfg=restore_checkpoint_cfg,
      config=config,
      library_dir=library_dir,
  )
  server = uvicorn.Server(
      uvicorn.Config(app, log_level='info', timeout_graceful_shutdown=int(config.request_timeout_s))
  )
  logging.info('Serving on http://%s:%d (pid %d)', host, port, os.getpid())
  # uvicorn handles SIGTERM/SIGINT itself (stop listening, finish the open requests, shut the app
  # down, which drains the batcher) and then re-raises the signal to the handler installed before
  # it started: make that one a no-op so a clean shutdown exits with status 0.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: None)
  server.run(sockets=[listening_socket(host, port)])
  print(f'Server on port {port} stopped after finishing the requests in flight.', flush=True)
