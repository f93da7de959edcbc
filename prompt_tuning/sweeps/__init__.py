"""Declarative sweeps: gin specs, local and Ray executors, collected tables and figures.

* `spec`: the `Sweep` spec (a gin file) and its expansion into named runs (`Plan`).
* `check`: validation of every run's gin configuration before anything runs.
* `runner`: run state on disk (done / running / failed / interrupted), the local executor, status.
* `ray_executor`: the same runs as Ray tasks on an existing (or local) Ray cluster.
* `collect`: every run's settings and metrics as CSV/JSON, Markdown tables of mean +/- std over
  seeds, figures in the paper's style.
* `vectorized`: runs that differ only in a prompt's initialization, seed or learning rate, trained
  together in one process (one backbone, one compilation, one input pipeline).

The command line is `python -m prompt_tuning.sweep run|status|collect` (`prompt_tuning/sweep.py`).
"""
