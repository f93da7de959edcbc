"""Dynamic batching across tasks: rows of any prompts gathered into one mixed-task batch.

Every request is split into rows (one input, or one input-candidate pair when scoring). Rows wait
in one bounded queue; a single worker takes the oldest row, gathers the rows that can share its
compiled function (same kind: sampling/greedy, beam search of one size, scoring) up to the largest
batch bucket or until `max_wait_ms` has passed, runs them as one batch on the engine's thread, and
answers each row's future. Rows of other kinds keep their place in the queue. Batches mix prompts
freely: each row carries its bank row (`prompt_ids`).

Back-pressure: `submit` refuses rows beyond `max_queue` (`QueueFullError`, answered 503 with
`Retry-After`). `drain()` stops admitting rows and returns once every admitted row is answered
(SIGTERM: in-flight requests finish).
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

import numpy as np


class QueueFullError(RuntimeError):
  """The queue holds `max_queue` rows: try again later."""


class DrainingError(RuntimeError):
  """The server is shutting down and admits no new requests."""


@dataclasses.dataclass
class Row:
  """One row of a batch.

  Attributes:
    group: rows with equal groups can share a batch: `('sample',)`, `('beam', k)`, `('score',)`.
    tokens: encoder input ids (EOS included).
    prompt_row: the bank row of the row's prompt.
    target: scoring: the target ids (EOS included).
    temperature: sampling temperature (0: greedy).
    seed: sampling seed (the first row's seed seeds its batch).
    future: answered with the row's result.
    enqueued: `time.monotonic()` at admission.
  """

  group: Tuple
  tokens: List[int]
  prompt_row: int
  target: Optional[List[int]] = None
  temperature: float = 0.0
  seed: int = 0
  future: Optional[asyncio.Future] = None
  enqueued: float = 0.0


class DynamicBatcher:
  """Gathers rows into batches and runs them on the engine (see the module docstring).

  Args:
    engine: a `ServingEngine`.
    max_batch_size: rows per batch (the engine's largest batch bucket).
    max_wait_ms: how long to wait for more rows once one is waiting.
    max_queue: rows admitted and not yet answered.
    on_batch: optional callback `(kind, rows, seconds)` after each batch (metrics).
  """

  def __init__(
      self,
      engine,
      *,
      max_batch_size: int,
      max_wait_ms: float = 5.0,
      max_queue: int = 256,
      on_batch: Optional[Callable[[str, int, float], None]] = None,
  ):
    self._engine = engine
    self._max_batch = int(max_batch_size)
    self._max_wait = float(max_wait_ms) / 1000.0
    self._max_queue = int(max_queue)
    self._on_batch = on_batch
    self._queue: Deque[Row] = collections.deque()
    self._pending = 0
    self._wakeup: Optional[asyncio.Event] = None
    self._task: Optional[asyncio.Task] = None
    self._draining = False
    # One thread runs the device work: batches never overlap on the device.
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='engine'
    )

  @property
  def queue_depth(self) -> int:
    """Rows admitted and not yet answered."""
    return self._pending

  def start(self) -> None:
    self._wakeup = asyncio.Event()
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def drain(self) -> None:
    """Admits nothing more; returns when every admitted row is answered and the worker stopped."""
    self._draining = True
    if self._wakeup is not None:
      self._wakeup.set()
    if self._task is not None:
      await self._task
    self._executor.shutdown(wait=True)

  def submit(self, rows: Sequence[Row]) -> List[asyncio.Future]:
    """Admits `rows` (all or none). Returns one future per row."""
    if self._draining:
      raise DrainingError('The server is shutting down; send the request to another replica.')
    if self._pending + len(rows) > self._max_queue:
      raise QueueFullError(
          f'The queue is full ({self._pending} rows waiting, at most {self._max_queue}).'
      )
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    futures = []
    for row in rows:
      row.future = loop.create_future()
      row.enqueued = now
      futures.append(row.future)
      self._queue.append(row)
    self._pending += len(rows)
    self._wakeup.set()
    return futures

  def _take(self, group: Tuple) -> List[Row]:
    """Removes up to `max_batch` live rows of `group` from the queue, oldest first."""
    taken, kept = [], collections.deque()
    while self._queue:
      row = self._queue.popleft()
      if row.future.done():  # Cancelled (timed out) while waiting: drop it.
        self._pending -= 1
        continue
      if row.group == group and len(taken) < self._max_batch:
        taken.append(row)
      else:
        kept.append(row)
    self._queue = kept
    return taken

  def _count(self, group: Tuple) -> int:
    return sum(1 for r in self._queue if r.group == group and not r.future.done())

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      if not self._queue:
        if self._draining:
          return
        self._wakeup.clear()
        await self._wakeup.wait()
        continue
      head = self._queue[0]
      if head.future.done():
        self._queue.popleft()
        self._pending -= 1
        continue
      # Wait (from the head row's admission) for more rows of its kind.
      deadline = head.enqueued + self._max_wait
      while self._count(head.group) < self._max_batch and not self._draining:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        self._wakeup.clear()
        try:
          await asyncio.wait_for(self._wakeup.wait(), remaining)
        except asyncio.TimeoutError:
          break
      rows = self._take(head.group)
      if not rows:
        continue
      start = time.monotonic()
      try:
        results = await loop.run_in_executor(self._executor, self._execute, head.group, rows)
      except Exception as e:  # pylint: disable=broad-except
        for row in rows:
          if not row.future.done():
            row.future.set_exception(e)
      else:
        for row, result in zip(rows, results):
          if not row.future.done():
            row.future.set_result(result)
      finally:
        self._pending -= len(rows)
      if self._on_batch is not None:
        self._on_batch(head.group[0], len(rows), time.monotonic() - start)

  def _execute(self, group: Tuple, rows: List[Row]) -> List[Any]:
    """Runs one batch on the engine (on the engine thread)."""
    tokens = [r.tokens for r in rows]
    prompt_rows = [r.prompt_row for r in rows]
    kind = group[0]
    if kind == 'score':
      scores = self._engine.score(tokens, [r.target for r in rows], prompt_rows)
      return [float(s) for s in scores]
    if kind == 'beam':
      out, scores = self._engine.generate(tokens, prompt_rows, beam_size=group[1])
    else:
      out, scores = self._engine.generate(
          tokens,
          prompt_rows,
          temperatures=[r.temperature for r in rows],
          seed=rows[0].seed,
      )
    return [(np.asarray(o).tolist(), float(s)) for o, s in zip(out, scores)]
