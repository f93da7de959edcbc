"""Serving many tasks from one frozen model: an HTTP server with mixed-task dynamic batching.

* `engine.ServingEngine`: the frozen backbone and a bank of prompts on the device; one compiled
  function per (kind, batch bucket, length bucket), all compiled at start-up, so serving never
  recompiles; each row of a batch picks its prompt with `prompt_ids`.
* `prompt_table.PromptTable`: prompt names -> bank rows, with reference counts so that replacing
  or removing a prompt never changes a row an in-flight request uses.
* `batcher.DynamicBatcher`: a bounded queue; requests for any prompts are gathered up to the
  largest batch bucket or a wait time into one mixed-task batch.
* `app.create_app`: the ASGI app (FastAPI): `POST /v1/generate`, `POST /v1/score`,
  `GET /v1/prompts`, `GET /healthz`, `GET /metrics` (Prometheus text format).

`python -m prompt_tuning.serve` (see `prompt_tuning/serve.py`) builds all of it from gin and a
prompt library.
"""
