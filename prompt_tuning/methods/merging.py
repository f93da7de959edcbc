"""Merging prompts and checkpoints, streamed one parameter at a time.

Methods (θ₀ the pretrained/base parameters, θ_t the tuned ones, τ_t = θ_t − θ₀ the task vectors; all
elementwise on parameters of the same name, computed in float64 and written in the base's dtype):

* ``average``: θ = Σ_i w_i θ_i / Σ_i w_i (weighted averaging of prompts; uniform model soup with
  equal weights; Wortsman et al. 2022).
* ``task_arithmetic``: θ = θ₀ + λ Σ_t τ_t (Ilharco et al. 2023; one scalar λ for the sum, negation
  by λ < 0).
* ``ties``: TIES-merging (Yadav et al. 2023), as `prateeky2806/ties-merging`'s `merge_utils`:
  trim each τ_t to its top-k magnitudes over the **whole model** (k = ⌊d·K⌋ for d entries and
  density K; the threshold is the (d−k)-th smallest |τ_t| and every entry ≥ it is kept), elect
  γ = sign(Σ_t τ̂_t) with zeros set to the global majority sign sign(Σ γ), take the disjoint mean
  τ_m = Σ_t τ̂_t·[τ̂_t agrees with γ] / max(1, #agreeing nonzero), and θ = θ₀ + λ τ_m.
* ``dare``: DARE (Yu et al. 2024), as MergeLM: each model's τ_t is dropped elementwise with rate p
  (m ~ Bernoulli(p)) and rescaled, τ̃_t = τ_t (1 − m) / (1 − p), then merged by `dare_merge`
  (task arithmetic, TIES or averaging of θ₀ + τ̃_t). The masks are seeded per (seed, model index,
  parameter name): `np.random.default_rng([seed, t, crc32(name)]).random(shape) < p`.
* ``fisher``: diagonal Fisher merging (Matena & Raffel 2022), as `mmatena/model_merging`:
  θ = Σ_j c_j F̂_j θ_j / Σ_j c_j F̂_j with F̂_j = max(F_j, floor) for the target model j = 0 (every
  model unless `favor_target`), and c_j = λ_j / ‖F_j‖₂ with `normalize_fishers` (the L2 norm over
  all merged entries of F_j). Fishers come from `estimate_fisher` (the runtime's model on a task).
* ``greedy_soup``: model soups' greedy recipe (`greedy_soup`): ingredients sorted by held-out score,
  each one kept in the running average only if the score strictly improves.

Streaming: a `Source` reads one named parameter at a time (T5X checkpoints through TensorStore, this
project's orbax checkpoints by partial restore, Hugging Face safetensors by byte range; `.npy` prompts
and library entries are small), and `Merger.compute(name)` merges one parameter from the sources'
copies of it. Writing a checkpoint pulls the merged parameters one by one
(`t5x_format.save(..., max_inflight_bytes=0)` with loader leaves), so the peak memory is a few
parameters, not the checkpoints. Methods with global statistics pass over the sources first: TIES
finds each task's exact global threshold by radix selection on the float64 bit patterns of |τ_t|
(four passes of 16-bit histograms) plus one pass for the majority sign; Fisher merging one pass for
the Fisher norms.

Parameters that are not floating point, or that match `exclude`, are copied from the base (or the
first model when there is none).
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from absl import logging
import numpy as np

from prompt_tuning import fs
from prompt_tuning import params as params_lib

METHODS = ('average', 'task_arithmetic', 'ties', 'dare', 'fisher')
DARE_MERGES = ('task_arithmetic', 'ties', 'average')
PROMPT_PATH = 'encoder/prompt/prompt/prompt'
# Entries merged at a time within one parameter (float64 temporaries stay a few MiB).
CHUNK = 1 << 16


class MergeError(ValueError):
  """Inputs that cannot be merged (mismatched names or shapes, bad options)."""


_LIBC = None


def release_memory() -> None:
  """Returns the memory of arrays already dropped to the OS (between two parameters).

  The checkpoint readers allocate each array in their own threads' malloc arenas, which glibc does
  not give back by itself; without this the resident size of a streamed merge creeps up to the
  size of the checkpoints even though only a few arrays are alive at any time.
  """
  global _LIBC
  import gc  # pylint: disable=g-import-not-at-top

  gc.collect()
  if _LIBC is None:
    try:
      import ctypes  # pylint: disable=g-import-not-at-top

      _LIBC = ctypes.CDLL('libc.so.6')
    except OSError:
      _LIBC = False
  if _LIBC:
    _LIBC.malloc_trim(0)


# ----------------------------------------------------------------------------------------------
# Sources: one parameter at a time.
# ----------------------------------------------------------------------------------------------


class Source:
  """Parameters by `/`-joined name, read one at a time."""

  label: str = '?'

  def names(self) -> List[str]:
    raise NotImplementedError

  def read(self, name: str) -> np.ndarray:
    raise NotImplementedError

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.label})'


class DictSource(Source):
  """A parameter tree (nested or flat dict) in memory."""

  def __init__(self, params: Mapping[str, Any], label: str = 'params'):
    self._flat = {k: v for k, v in params_lib.flatten_params(params).items()}
    self.label = label

  def names(self) -> List[str]:
    return list(self._flat)

  def read(self, name: str) -> np.ndarray:
    return np.asarray(self._flat[name])


class LoaderSource(Source):
  """`{name: zero-argument loader}` (e.g. `huggingface.lazy_params`)."""

  def __init__(self, loaders: Mapping[str, Callable[[], Any]], label: str):
    self._loaders = dict(loaders)
    self.label = label

  def names(self) -> List[str]:
    return list(self._loaders)

  def read(self, name: str) -> np.ndarray:
    return np.asarray(self._loaders[name]())


class CheckpointSource(Source):
  """A checkpoint of any format `checkpoints.formats` knows, read one variable at a time."""

  def __init__(self, path: str):
    from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

    self._ckpt = formats.resolve(path)
    self.label = self._ckpt.path
    self._names = None
    self._hf = None
    if self._ckpt.format == 'huggingface':
      from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

      _, loaders = huggingface.lazy_params(self._ckpt.path)
      self._hf = LoaderSource(loaders, self.label)

  @property
  def format(self) -> str:
    return self._ckpt.format

  def names(self) -> List[str]:
    if self._hf is not None:
      return self._hf.names()
    if self._names is None:
      from prompt_tuning.checkpoints import orbax_format  # pylint: disable=g-import-not-at-top
      from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

      if self._ckpt.format == 't5x':
        self._names = list(t5x_format.list_variables(self._ckpt.path))
      else:
        self._names = orbax_format.trainable_paths(self._ckpt.path)
    return list(self._names)

  def read(self, name: str) -> np.ndarray:
    if self._hf is not None:
      return self._hf.read(name)
    from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

    flat = params_lib.flatten_params(formats.load_params(self._ckpt, variables=[name]))
    return np.asarray(flat[name])


def open_source(value: Union[str, Source, Mapping[str, Any]], backbone: Any = None) -> Source:
  """A `Source` for a checkpoint path, a `.npy` prompt, a `library:NAME` entry or a dict.

  Prompts (`.npy`, library entries) become a one-parameter source named `PROMPT_PATH`; a library
  entry is checked against `backbone` when given.
  """
  if isinstance(value, Source):
    return value
  if isinstance(value, Mapping):
    return DictSource(value)
  value = str(value)
  from prompt_tuning import library  # pylint: disable=g-import-not-at-top

  if library.is_ref(value):
    array = library.load_prompt(value, backbone=backbone)
    return DictSource({PROMPT_PATH: array}, label=value)
  if fs.isfile(value) and value.endswith('.npy'):
    with fs.open(value, 'rb') as f:
      return DictSource({PROMPT_PATH: np.load(f, allow_pickle=False)}, label=value)
  return CheckpointSource(value)


# ----------------------------------------------------------------------------------------------
# The merge.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MergeConfig:
  """Options of a merge (see the module docstring for the formulas).

  Attributes:
    method: one of `METHODS`.
    weights: `average`: w_i (default uniform); `fisher`: λ_j (default uniform).
    scale: λ of task arithmetic, TIES and DARE (θ₀ + λ·merged task vector).
    density: TIES' K, the fraction of each task vector kept (global top-k).
    drop_rate: DARE's p, one for all models or one per model.
    rescale: DARE's rescaling by 1 / (1 − p) (on in the paper; MergeLM's CLI defaults to off).
    dare_merge: how DARE'd models are merged: 'task_arithmetic', 'ties' or 'average'.
    seed: DARE's seed.
    fisher_floor: Fisher floor (`max(F, floor)`).
    favor_target: floor only the first model's Fisher (mmatena's default).
    normalize_fishers: divide λ_j by ‖F_j‖₂.
    exclude: regexes of parameter paths copied from the base instead of merged.
  """

  method: str = 'task_arithmetic'
  weights: Optional[Sequence[float]] = None
  scale: float = 1.0
  density: float = 0.2
  drop_rate: Union[float, Sequence[float]] = 0.9
  rescale: bool = True
  dare_merge: str = 'task_arithmetic'
  seed: int = 0
  fisher_floor: float = 1e-6
  favor_target: bool = True
  normalize_fishers: bool = True
  exclude: Sequence[str] = ()


def _is_float(x: np.ndarray) -> bool:
  return x.dtype.kind == 'f' or x.dtype.name == 'bfloat16'


class _RadixSelect:
  """Exact k-th smallest (1-indexed) of non-negative float64 values streamed in chunks.

  Non-negative IEEE doubles order like their uint64 bit patterns, so the value is found digit by
  digit: 16 bits per pass over the data, four passes.
  """

  DIGITS = 4

  def __init__(self, k: int):
    self.k = int(k)
    self.level = 0
    self.prefix = 0
    self.rank = int(k)  # rank within the values sharing `prefix`
    self.hist = np.zeros(1 << 16, np.int64)

  def add(self, values: np.ndarray) -> None:
    bits = np.ascontiguousarray(values, dtype=np.float64).reshape(-1).view(np.uint64)
    shift = np.uint64(48 - 16 * self.level)
    if self.level:
      bits = bits[(bits >> (shift + np.uint64(16))) == np.uint64(self.prefix)]
    digits = ((bits >> shift) & np.uint64(0xFFFF)).astype(np.int64)
    self.hist += np.bincount(digits, minlength=1 << 16)

  def finish_pass(self) -> None:
    cum = np.cumsum(self.hist)
    digit = int(np.searchsorted(cum, self.rank))  # first digit whose cumulative count >= rank
    below = int(cum[digit - 1]) if digit else 0
    self.rank -= below
    self.prefix = (self.prefix << 16) | digit
    self.level += 1
    self.hist[:] = 0

  @property
  def done(self) -> bool:
    return self.level == self.DIGITS

  @property
  def value(self) -> float:
    return float(np.array([self.prefix], np.uint64).view(np.float64)[0])


class Merger:
  """Merges `models` (and a `base`) parameter by parameter.

  Usage: `merger = Merger(config, models, base, fishers)`; `merger.prepare()` runs the passes over
  the sources that the method's global statistics need; then `merger.compute(name)` for each name
  of `merger.names()` (or `write_t5x` / `to_dict`).
  """

  def __init__(
      self,
      config: MergeConfig,
      models: Sequence[Source],
      base: Optional[Source] = None,
      fishers: Optional[Sequence[Source]] = None,
  ):
    self.config = config
    self.models = [open_source(m) for m in models]
    self.base = open_source(base) if base is not None else None
    self.fishers = [open_source(f) for f in fishers] if fishers else None
    method = config.method
    if method not in METHODS:
      raise MergeError(f'Unknown merge method {method!r}; choose one of {", ".join(METHODS)}.')
    if not self.models:
      raise MergeError('Nothing to merge: give at least one model.')
    needs_base = method in ('task_arithmetic', 'ties', 'dare')
    if needs_base and self.base is None:
      raise MergeError(
          f'{method} merges task vectors θ_t − θ₀: give the base (pretrained) checkpoint '
          '(--base).'
      )
    if method == 'dare' and config.dare_merge not in DARE_MERGES:
      raise MergeError(f'dare_merge must be one of {DARE_MERGES}, got {config.dare_merge!r}.')
    if method == 'fisher':
      if not self.fishers or len(self.fishers) != len(self.models):
        raise MergeError(
            f'Fisher merging needs one Fisher per model ({len(self.models)} models, '
            f'{len(self.fishers or [])} Fishers); estimate them with `merge fisher`.'
        )
    n = len(self.models)
    if config.weights is not None and len(config.weights) != n:
      raise MergeError(f'{len(config.weights)} weights for {n} models.')
    drop = config.drop_rate
    self._drop = [float(d) for d in drop] if isinstance(drop, (list, tuple)) else [float(drop)] * n
    if len(self._drop) != n or any(not 0.0 <= d <= 1.0 for d in self._drop):
      raise MergeError(f'drop_rate must be one value (or one per model) in [0, 1], got {drop}.')
    if method in ('ties',) or (method == 'dare' and config.dare_merge == 'ties'):
      if not 0.0 < config.density <= 1.0:
        raise MergeError(f'TIES density must be in (0, 1], got {config.density}.')
    self._exclude = params_lib.match_any(list(config.exclude)) if config.exclude else None
    self._check_names()
    self._thresholds: Optional[List[float]] = None
    self._majority = 0.0
    self._fisher_coeffs: Optional[List[float]] = None
    self.prepared = False

  # ----- names -----

  def _check_names(self) -> None:
    reference = self.base or self.models[0]
    names = reference.names()
    self._names = names
    others = list(self.models) + list(self.fishers or [])
    for source in others:
      theirs = set(source.names())
      missing = [n for n in names if n not in theirs and not self._skipped_name(n)]
      if missing:
        raise MergeError(
            f'{source.label} lacks {len(missing)} parameter(s) of {reference.label}, e.g. '
            f'{missing[:3]}: merge checkpoints of one architecture (a prompt-only checkpoint '
            'holds only the prompt; give the full model-tuning checkpoints).'
        )

  def _skipped_name(self, name: str) -> bool:
    return bool(self._exclude and self._exclude(name))

  def names(self) -> List[str]:
    return list(self._names)

  def _merged(self, name: str, reference: np.ndarray) -> bool:
    return _is_float(reference) and not self._skipped_name(name)

  # ----- per-parameter pieces -----

  def _read_all(self, name: str):
    ref_source = self.base or self.models[0]
    reference = ref_source.read(name)
    models = [reference if s is ref_source else s.read(name) for s in self.models]
    for source, value in zip(self.models, models):
      if value.shape != reference.shape:
        raise MergeError(
            f'Parameter {name!r} has shape {value.shape} in {source.label} but '
            f'{reference.shape} in {ref_source.label}.'
        )
    return reference, models

  def _chunks(self, name: str, reference: np.ndarray, models: Sequence[np.ndarray]):
    """Yields `(slice, θ₀ chunk, [θ_t chunks], [τ_t chunks])` over the flattened parameter, in
    float64, `CHUNK` entries at a time (DARE's masks drawn chunk by chunk from one generator per
    model and parameter, which gives the same mask as one draw of the whole shape)."""
    c = self.config
    n = reference.size
    ref = reference.reshape(-1)
    flat = [m.reshape(-1) for m in models]
    rngs = None
    if c.method == 'dare':
      rngs = [
          np.random.default_rng([int(c.seed), t, zlib.crc32(name.encode('utf-8'))])
          for t in range(len(models))
      ]
    for start in range(0, max(n, 1), CHUNK):
      sl = slice(start, min(n, start + CHUNK))
      base = ref[sl].astype(np.float64)
      values = [m[sl].astype(np.float64) for m in flat]
      taus = [v - base for v in values]
      if rngs is not None:
        for t, rng in enumerate(rngs):
          p = self._drop[t]
          keep = ~(rng.random(base.shape[0]) < p)
          tau = np.where(keep, taus[t], 0.0)
          if c.rescale and p < 1.0:
            tau = tau / (1.0 - p)
          taus[t] = tau
      yield sl, base, values, taus

  def _uses_ties(self) -> bool:
    c = self.config
    return c.method == 'ties' or (c.method == 'dare' and c.dare_merge == 'ties')

  # ----- passes -----

  def _pass(self, what: str, fn: Callable[[str], None]) -> None:
    names = self.names()
    start = last = time.time()
    for i, name in enumerate(names):
      fn(name)
      release_memory()
      if time.time() - last > 5.0:
        last = time.time()
        logging.info('%s: %d/%d parameters (%.0fs)', what, i + 1, len(names), last - start)
    logging.info('%s: %d parameters in %.1fs', what, len(names), time.time() - start)

  def prepare(self) -> 'Merger':
    """Runs the statistics passes the method needs (TIES thresholds and sign; Fisher norms)."""
    if self.prepared:
      return self
    if self._uses_ties():
      self._prepare_ties()
    if self.config.method == 'fisher':
      self._prepare_fisher()
    self.prepared = True
    return self

  def _prepare_ties(self) -> None:
    count = [0]

    def count_entries(name):
      base = (self.base or self.models[0]).read(name)
      if self._merged(name, base):
        count[0] += base.size

    self._pass('TIES: counting entries', count_entries)
    d = count[0]
    keep = int(np.floor(d * self.config.density))
    j = d - keep  # the j-th smallest |τ| is the threshold (1-indexed); >= it is kept
    if j <= 0:
      self._thresholds = [0.0] * len(self.models)
    else:
      selectors = [_RadixSelect(j) for _ in self.models]
      for level in range(_RadixSelect.DIGITS):

        def histogram(name):
          reference, models = self._read_all(name)
          if not self._merged(name, reference):
            return
          for _, _, _, taus in self._chunks(name, reference, models):
            for sel, tau in zip(selectors, taus):
              sel.add(np.abs(tau))

        self._pass(f'TIES: threshold digit {level + 1}/{_RadixSelect.DIGITS}', histogram)
        for sel in selectors:
          sel.finish_pass()
      self._thresholds = [sel.value for sel in selectors]
    total = [0]

    def signs(name):
      reference, models = self._read_all(name)
      if not self._merged(name, reference):
        return
      for _, _, _, taus in self._chunks(name, reference, models):
        total[0] += int(np.sign(self._trim(taus).sum(axis=0)).sum())

    self._pass('TIES: majority sign', signs)
    self._majority = float(np.sign(total[0]))
    logging.info(
        'TIES: %d entries, keeping %d per task; thresholds %s; majority sign %+d',
        d,
        keep,
        self._thresholds,
        int(self._majority),
    )

  def _trim(self, taus: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.where(np.abs(t) >= thr, t, 0.0) for t, thr in zip(taus, self._thresholds)])

  def _prepare_fisher(self) -> None:
    sums = [0.0] * len(self.fishers)

    def norms(name):
      reference = (self.base or self.models[0]).read(name)
      if not self._merged(name, reference):
        return
      for j, source in enumerate(self.fishers):
        f = source.read(name).astype(np.float64)
        sums[j] += float(np.sum(f * f))

    weights = self.config.weights or [1.0] * len(self.models)
    if self.config.normalize_fishers:
      self._pass('Fisher: norms', norms)
      zero = [self.fishers[j].label for j, s in enumerate(sums) if s == 0.0]
      if zero:
        raise MergeError(f'The Fisher {zero[0]} is zero everywhere; it cannot be normalized.')
      self._fisher_coeffs = [w / np.sqrt(s) for w, s in zip(weights, sums)]
    else:
      self._fisher_coeffs = [float(w) for w in weights]

  # ----- one parameter -----

  def compute(self, name: str) -> np.ndarray:
    """The merged parameter `name` (in the base's dtype)."""
    if not self.prepared:
      self.prepare()
    c = self.config
    reference, models = self._read_all(name)
    if not self._merged(name, reference):
      return reference
    out = np.empty(reference.size, reference.dtype)
    fishers = None
    if c.method == 'fisher':
      fishers = [source.read(name).reshape(-1) for source in self.fishers]
    weights = np.asarray(c.weights if c.weights is not None else [1.0] * len(models), np.float64)
    method = c.dare_merge if c.method == 'dare' else c.method
    for sl, base, values, taus in self._chunks(name, reference, models):
      if c.method == 'average':
        merged = sum(w * v for w, v in zip(weights, values)) / weights.sum()
      elif c.method == 'fisher':
        lhs = np.zeros_like(base)
        rhs = np.zeros_like(base)
        for j, (v, fisher, coeff) in enumerate(zip(values, fishers, self._fisher_coeffs)):
          diag = fisher[sl].astype(np.float64)
          if not c.favor_target or j == 0:
            diag = np.maximum(diag, c.fisher_floor)
          lhs += coeff * diag
          rhs += coeff * diag * v
        merged = rhs / lhs
      elif method == 'average':
        merged = base + sum(taus) / len(taus)
      elif method == 'task_arithmetic':
        merged = base + c.scale * sum(taus)
      else:  # ties
        trimmed = self._trim(taus)
        gamma = np.sign(trimmed.sum(axis=0))
        gamma[gamma == 0] = self._majority
        agree = np.where(gamma[None] > 0, trimmed > 0, trimmed < 0)
        selected = trimmed * agree
        counts = (selected != 0).sum(axis=0)
        merged = base + c.scale * (selected.sum(axis=0) / np.maximum(counts, 1))
      out[sl] = merged
    return out.reshape(reference.shape)

  # ----- outputs -----

  def to_dict(self) -> Dict[str, Any]:
    """The merged parameters as a nested dict (in memory)."""
    self.prepare()
    return params_lib.unflatten_params({n: self.compute(n) for n in self.names()})

  def write_t5x(self, path: str, step: int = 0, overwrite: bool = False) -> str:
    """Writes the merge as a T5X checkpoint, one parameter at a time (atomic: tmp then rename)."""
    from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

    self.prepare()
    names = self.names()
    start = time.time()
    progress = {'i': 0, 'last': start}

    def loader(name):
      def load():
        release_memory()  # what the previous parameter left behind
        value = self.compute(name)
        progress['i'] += 1
        if time.time() - progress['last'] > 5.0 or progress['i'] == len(names):
          progress['last'] = time.time()
          logging.info(
              'merge: %d/%d parameters written (%.0fs)',
              progress['i'],
              len(names),
              time.time() - start,
          )
        return value

      return load

    tree = params_lib.unflatten_params({n: loader(n) for n in names})
    return t5x_format.save(path, tree, step, overwrite=overwrite, max_inflight_bytes=0)


def merge(
    config: MergeConfig,
    models: Sequence[Any],
    base: Any = None,
    fishers: Optional[Sequence[Any]] = None,
) -> Dict[str, Any]:
  """In-memory convenience: the merged parameter tree (see `Merger`)."""
  return Merger(config, models, base, fishers).to_dict()


# ----------------------------------------------------------------------------------------------
# Greedy soup.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SoupResult:
  """What `greedy_soup` did."""

  order: List[int]  # ingredient indices by descending held-out score
  scores: List[float]  # held-out score of each ingredient (input order)
  accepted: List[int]  # ingredients in the soup, in the order they were added
  soup_score: float
  soup: Any  # the final soup: a Source (or the path it was written to)


def greedy_soup(
    models: Sequence[Any],
    score_fn: Callable[[Source], float],
    *,
    work_dir: Optional[str] = None,
    scores: Optional[Sequence[float]] = None,
) -> SoupResult:
  """Greedy soup (Wortsman et al. 2022, `model-soups/main.py`).

  Ingredients are sorted by held-out score, descending (a stable ascending sort, reversed: among
  equal scores the later model comes first); the soup starts as the best one; each next ingredient
  i makes the candidate soup·k/(k+1) + θ_i/(k+1) (k ingredients so far), kept iff its held-out score
  is strictly greater than the best so far. One pass; rejected ingredients are not revisited.

  Args:
    models: ingredients (paths, dicts or `Source`s).
    score_fn: held-out score of a `Source` (higher is better), e.g. `EvalScorer`.
    work_dir: with it, candidate soups are written there as T5X checkpoints (streamed), so
      ingredients larger than memory work; without, soups are kept in memory.
    scores: the ingredients' held-out scores if already known (else `score_fn` of each).

  Returns:
    A `SoupResult`.
  """
  sources = [open_source(m) for m in models]
  if scores is None:
    scores = [float(score_fn(s)) for s in sources]
  scores = [float(s) for s in scores]
  order = [int(i) for i in np.argsort(np.asarray(scores), kind='stable')[::-1]]
  soup: Source = sources[order[0]]
  best = scores[order[0]]
  accepted = [order[0]]
  for step, i in enumerate(order[1:]):
    k = len(accepted)
    merger = Merger(
        MergeConfig(method='average', weights=[k / (k + 1), 1 / (k + 1)]), [soup, sources[i]]
    )
    if work_dir is not None:
      path = merger.write_t5x(fs.join(work_dir, f'candidate_{step}'), overwrite=True)
      candidate: Source = CheckpointSource(path)
    else:
      candidate = DictSource(merger.to_dict(), label=f'candidate_{step}')
    score = float(score_fn(candidate))
    logging.info(
        'greedy soup: + ingredient %d -> %.6g (best %.6g): %s',
        i,
        score,
        best,
        'kept' if score > best else 'rejected',
    )
    if score > best:
      soup, best = candidate, score
      accepted.append(i)
  return SoupResult(order, scores, accepted, best, soup)


@dataclasses.dataclass
class EvalScorer:
  """Held-out score of a checkpoint through `python -m prompt_tuning.eval` (for greedy soups).

  Runs the eval entry point in a subprocess with `gin_files` and `bindings` plus
  `CHECKPOINT_PATH=<the candidate>` and `EVAL_OUTPUT_DIR=<a fresh directory>`, and reads `metric`
  (`task/metric`, e.g. `toy_heldout_indoor/accuracy`) from the `metrics.json` it writes.
  """

  gin_files: Sequence[str]
  bindings: Mapping[str, str]
  metric: str
  work_dir: str
  gin_search_paths: Sequence[str] = ()
  env: Optional[Mapping[str, str]] = None
  calls: int = 0

  def __call__(self, source: Source) -> float:
    import json  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    path = source.label
    if not isinstance(source, CheckpointSource):
      path = Merger(MergeConfig(method='average'), [source]).write_t5x(
          fs.join(self.work_dir, f'ingredient_{self.calls}'), overwrite=True
      )
    out = fs.join(self.work_dir, f'eval_{self.calls}')
    self.calls += 1
    args = [sys.executable, '-m', 'prompt_tuning.eval']
    args += [f'--gin_file={g}' for g in self.gin_files]
    if self.gin_search_paths:
      args.append(f'--gin_search_paths={",".join(self.gin_search_paths)}')
    bindings = dict(self.bindings)
    bindings['CHECKPOINT_PATH'] = repr(str(path))
    bindings['EVAL_OUTPUT_DIR'] = repr(str(out))
    args += [f'--gin.{k}={v}' for k, v in bindings.items()]
    proc = subprocess.run(
        args,
        env=dict(self.env) if self.env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
      raise MergeError(
          f'Evaluating {path} for the greedy soup failed (exit {proc.returncode}):\n'
          f'{proc.stdout[-3000:]}'
      )
    task, _, name = self.metric.rpartition('/')
    results = json.loads(fs.read_text(fs.join(out, 'metrics.json')))
    if task not in results or name not in results[task]:
      raise MergeError(
          f'The evaluation has no metric {self.metric!r}; it reported '
          f'{[f"{t}/{m}" for t, ms in results.items() for m in ms]}.'
      )
    return float(results[task][name])


# ----------------------------------------------------------------------------------------------
# Fisher estimation.
# ----------------------------------------------------------------------------------------------


def per_example_fisher(
    log_prob_fn: Callable[[Any, Any], Any],
    params: Any,
    examples: Any,
    *,
    expected: bool = True,
) -> Any:
  """Σ over `examples` of the diagonal Fisher terms (a tree like `params`, float32 sums).

  Args:
    log_prob_fn: `(params, example) -> [C] log-probabilities` of the classes (for `expected`), or a
      scalar log-likelihood of the example's observed target (empirical Fisher).
    params: the parameters to take gradients of.
    examples: a batch (pytree with a leading example axis), handled one example at a time (vmap).
    expected: `Σ_c p(c|x) (∂ log p(c|x) / ∂θ)²`, the expectation over the model's own predictive
      distribution (mmatena's `expectation_wrt_logits=True`); else `(∂ log p(y|x) / ∂θ)²`.

  Returns:
    The sum over the batch; divide by the number of examples for the mean.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def one(example):
    if not expected:
      grads = jax.grad(lambda p: log_prob_fn(p, example))(params)
      return jax.tree_util.tree_map(jnp.square, grads)
    log_probs = log_prob_fn(params, example)
    probs = jax.lax.stop_gradient(jnp.exp(log_probs))
    jac = jax.jacrev(lambda p: log_prob_fn(p, example))(params)  # leaves [C, ...]
    return jax.tree_util.tree_map(lambda g: jnp.tensordot(probs, jnp.square(g), axes=(0, 0)), jac)

  per_example = jax.vmap(one)(examples)
  return jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), per_example)


# ----------------------------------------------------------------------------------------------
# Prompts.
# ----------------------------------------------------------------------------------------------


def write_prompt(array: np.ndarray, output: str, metadata: Mapping[str, Any], backbone: Any) -> str:
  """Writes a merged prompt to a `.npy` file or a `library:NAME` entry (in $LIBRARY_DIR)."""
  from prompt_tuning import library  # pylint: disable=g-import-not-at-top

  if library.is_ref(output):
    info = library.Library(library.default_library_dir(metadata.get('library_dir'))).add(
        library.parse_ref(output),
        array,
        dict(metadata),
        backbone=backbone,
        allow_no_backbone=backbone is None,
        overwrite=True,
    )
    return f'library:{info.name}'
  import io  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  np.save(buffer, array)
  fs.write_bytes(output, buffer.getvalue())
  return output


def peak_rss_bytes() -> int:
  """This process's peak resident set size (bytes).

  Linux's `VmHWM` (the high-water mark of this program's memory), not `getrusage`'s `ru_maxrss`,
  which after `fork` + `exec` also counts the parent's memory at the fork.
  """
  try:
    with open('/proc/self/status') as f:  # pylint: disable=unspecified-encoding
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource  # pylint: disable=g-import-not-at-top

  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_rss_bytes() -> int:
  """This process's current resident set size (bytes; Linux)."""
  try:
    with open('/proc/self/statm') as f:  # pylint: disable=unspecified-encoding
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return 0


# ----------------------------------------------------------------------------------------------
# Command line: python -m prompt_tuning.merge
# ----------------------------------------------------------------------------------------------


def _split(values: Optional[Sequence[str]]) -> List[str]:
  out = []
  for value in values or ():
    out += [v for v in str(value).split(',') if v]
  return out


def _floats(values: Optional[Sequence[str]]) -> Optional[List[float]]:
  items = _split(values)
  return [float(v) for v in items] if items else None


def _is_prompt_ref(value: str) -> bool:
  from prompt_tuning import library  # pylint: disable=g-import-not-at-top

  return library.is_ref(value) or value.endswith('.npy')


def _prompt_sources(refs: Sequence[str], library_dir: Optional[str], backbone: Any):
  """Sources of prompts, checking that library entries share one backbone; returns (sources, fp)."""
  from prompt_tuning import library  # pylint: disable=g-import-not-at-top

  sources, fingerprint, first = [], None, None
  for ref in refs:
    if library.is_ref(ref):
      entry = library.load_entry(ref, library_dir, backbone=backbone)
      fp = entry.fingerprint
      if fp is not None and fingerprint is not None and fp != fingerprint:
        raise MergeError(
            f'{ref} was trained on backbone {fp} but {first} on {fingerprint}: only prompts of '
            'one backbone can be merged (recycle one of them first: python -m prompt_tuning.recycle).'
        )
      if fp is not None and fingerprint is None:
        fingerprint, first = fp, ref
      sources.append(DictSource({PROMPT_PATH: entry.array}, label=ref))
    else:
      sources.append(open_source(ref))
  return sources, fingerprint


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m prompt_tuning.merge`; returns the exit code."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog='python -m prompt_tuning.merge',
      description=(
          "Merge checkpoints (T5X, Hugging Face or this project's; streamed one parameter at a "
          'time) or prompts (.npy files, library:NAME entries of one backbone).'
      ),
  )
  parser.add_argument('--method', default='task_arithmetic', choices=METHODS + ('greedy_soup',))
  parser.add_argument('--models', action='append', required=True, help='comma-separated inputs')
  parser.add_argument('--base', help='the pretrained checkpoint (or base prompt) θ₀')
  parser.add_argument(
      '--output', required=True, help='checkpoint directory (T5X), .npy or library:NAME'
  )
  parser.add_argument('--weights', action='append', help='average / fisher weights')
  parser.add_argument('--scale', type=float, default=1.0, help='λ (task arithmetic, TIES, DARE)')
  parser.add_argument('--density', type=float, default=0.2, help='TIES: fraction kept (K)')
  parser.add_argument('--drop_rate', action='append', help='DARE: p (one, or one per model)')
  parser.add_argument('--no_rescale', action='store_true', help='DARE without 1/(1-p)')
  parser.add_argument('--dare_merge', default='task_arithmetic', choices=DARE_MERGES)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--fishers', action='append', help='Fisher checkpoints, one per model')
  parser.add_argument('--fisher_floor', type=float, default=1e-6)
  parser.add_argument('--no_favor_target', action='store_true')
  parser.add_argument('--no_normalize_fishers', action='store_true')
  parser.add_argument('--exclude', action='append', default=[], help='regex: copy from the base')
  parser.add_argument('--step', type=int, default=0, help='step recorded in the output checkpoint')
  parser.add_argument('--overwrite', action='store_true')
  parser.add_argument('--library', help='library of library:NAME inputs/outputs (LIBRARY_DIR)')
  parser.add_argument('--backbone', help='the frozen checkpoint prompts are used with (checked)')
  parser.add_argument('--eval_gin_file', action='append', default=[], help='greedy soup: eval gin')
  parser.add_argument('--eval_gin', action='append', default=[], help='greedy soup: NAME=VALUE')
  parser.add_argument('--gin_search_paths', default='', help='greedy soup: gin search paths')
  parser.add_argument('--metric', help='greedy soup: held-out metric, task/metric')
  parser.add_argument('--work_dir', help='greedy soup: where candidate soups are written')
  parser.add_argument('--report_memory', action='store_true', help='print peak RSS as JSON')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  if args.report_memory:
    # The baseline is the process with every reader imported, before any parameter is read.
    import flax.serialization  # pylint: disable=g-import-not-at-top,unused-import
    import tensorstore  # pylint: disable=g-import-not-at-top,unused-import
    from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top,unused-import
  baseline_rss = current_rss_bytes()
  try:
    from prompt_tuning import library  # pylint: disable=g-import-not-at-top

    if args.library:
      os.environ[library.ENV_VAR] = args.library
    models = _split(args.models)
    prompt_mode = all(_is_prompt_ref(m) for m in models)
    config = MergeConfig(
        method=args.method if args.method != 'greedy_soup' else 'average',
        weights=_floats(args.weights),
        scale=args.scale,
        density=args.density,
        drop_rate=_floats(args.drop_rate) or 0.9,
        rescale=not args.no_rescale,
        dare_merge=args.dare_merge,
        seed=args.seed,
        fisher_floor=args.fisher_floor,
        favor_target=not args.no_favor_target,
        normalize_fishers=not args.no_normalize_fishers,
        exclude=args.exclude,
    )
    if isinstance(config.drop_rate, list) and len(config.drop_rate) == 1:
      config.drop_rate = config.drop_rate[0]
    fishers = _split(args.fishers) or None
    if prompt_mode:
      if args.method in ('greedy_soup', 'fisher'):
        raise MergeError(f'--method={args.method} merges checkpoints, not prompts.')
      refs = models + ([args.base] if args.base else [])
      sources, fingerprint = _prompt_sources(refs, args.library, args.backbone)
      base = sources[-1] if args.base else None
      merged = Merger(config, sources[: len(models)], base).to_dict()
      array = params_lib.flatten_params(merged)[PROMPT_PATH]
      meta = {
          'method': f'merge/{args.method}',
          'merged_from': models,
          'base': args.base,
          'options': dataclasses.asdict(config),
          'library_dir': args.library,
      }
      written = write_prompt(array, args.output, meta, args.backbone or fingerprint)
      print(f'wrote the merged prompt {tuple(array.shape)} to {written}')
    else:
      if not args.overwrite and fs.exists(args.output):
        raise MergeError(f'{args.output} exists; pass --overwrite to replace it.')
      if args.method == 'greedy_soup':
        if not args.metric or not args.eval_gin_file:
          raise MergeError(
              'greedy_soup scores candidate soups with python -m prompt_tuning.eval: give '
              '--eval_gin_file (e.g. a model gin and runs/eval.gin), --eval_gin bindings and '
              '--metric task/metric.'
          )
        work_dir = args.work_dir or f'{fs.abspath(args.output)}.work'
        fs.makedirs(work_dir)
        scorer = EvalScorer(
            gin_files=args.eval_gin_file,
            bindings=dict(b.split('=', 1) for b in args.eval_gin),
            metric=args.metric,
            work_dir=work_dir,
            gin_search_paths=_split([args.gin_search_paths]),
        )
        result = greedy_soup(models, scorer, work_dir=work_dir)
        Merger(MergeConfig(method='average'), [result.soup]).write_t5x(
            args.output, args.step, overwrite=args.overwrite
        )
        print(
            json.dumps(
                {
                    'scores': dict(zip(models, result.scores)),
                    'accepted': [models[i] for i in result.accepted],
                    'soup_score': result.soup_score,
                }
            )
        )
      else:
        merger = Merger(config, models, args.base, fishers)
        merger.write_t5x(args.output, args.step, overwrite=args.overwrite)
      print(f'wrote the merged checkpoint {args.output}')
  except (MergeError, ValueError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f'ERROR: {type(e).__name__}: {msg}', file=sys.stderr)
    return 1
  if args.report_memory:
    print(
        'MEMORY ' + json.dumps({'baseline_rss': baseline_rss, 'peak_rss': peak_rss_bytes()}),
        flush=True,
    )
  return 0
