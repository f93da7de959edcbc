"""Length-bucketed batches: each batch padded to one of a few lengths, not to TASK_FEATURE_LENGTHS.

The paper's recipe pads every example to TASK_FEATURE_LENGTHS without packing (prompts need one
example per row), so on a task whose inputs average a few dozen tokens most of every step is padding.
With bucketing (`utils.DatasetConfig.bucketing = @bucketing.BucketConfig()`, off by default, which
keeps T5X's semantics) the runtime

- sorts examples into a small set of padded lengths (*buckets*) per bucketed feature, chosen from the
  task's length distribution (`num_buckets`, from `sample_size` examples) or given (`lengths`);
- forms every batch from examples of one bucket, and trims the batch's padding to that bucket's
  length after seqio's feature converter. This is exact: the trimmed positions hold pad tokens
  (id 0) and zero loss weights in every feature of the row, the model derives its attention masks
  from the tokens, relative position biases depend only on position differences, and the decoder
  is causal. The jitted steps are compiled once per bucket shape (at most the product of the
  features' bucket counts; the last bucket of a feature is always its full padded length).

Features are named as in TASK_FEATURE_LENGTHS: `'inputs'` covers the model features `encoder_*`
(the encoder inputs; a prompted model prepends its prompt inside the model, so buckets count raw
input tokens), `'targets'` covers `decoder_*` (for a decoder-only model this is the whole decoder
sequence, inputs and targets together). By default only `'inputs'` is bucketed (`'targets'` for
decoder-only models).

Training (`bucket_batches`): examples arrive in seqio's (seeded, shuffled) order and join their
bucket's queue; a queue that holds a full batch emits it (tf.data's `group_by_window`), so at most
`batch_size - 1` examples wait per bucket. The emitted batches are shuffled again within a window of
`shuffle_window` batches (seeded), so no bucket comes out in runs. The stream is a deterministic
function of the seed, so a resumed run that skips the batches it already consumed sees exactly the
batches of an uninterrupted run, and every process of a multi-process run (which all read the same
global stream and keep their rows) picks the same bucket at every step.

Evaluation and inference (`bucket_host_examples`): examples are read in windows of `window` batches,
grouped by bucket (stable, in dataset order) and batched within a bucket; every output carries its
example's index, so results come back in dataset order and equal those of the unbucketed run.
Decoding keeps the full `targets` length (it bounds the generated length), so predictions bucket
only `'inputs'`; scoring buckets both.

Two things do depend on the padded target length and are not comparable across bucketings: the
training metrics `loss_per_all_target_tokens` and `nonpadding_fraction`, and the loss itself under
`loss_normalizing_factor = NUM_TOTAL_TARGET_TOKENS` (bucketing `'targets'` is refused then). With
dropout, masks are drawn per padded shape, so bucketed and unbucketed runs draw different (equally
distributed) masks.
"""

import dataclasses
import itertools
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Task feature name -> prefix of the model features (seqio feature converter outputs) it covers.
GROUP_PREFIXES = {'inputs': 'encoder_', 'targets': 'decoder_'}


class BucketError(ValueError):
  """A bucketing configuration that cannot work (names the cause and the fix)."""


@dataclasses.dataclass(frozen=True)
class BucketConfig:
  """Length bucketing of a dataset (`utils.DatasetConfig.bucketing`; see the module docstring).

  Attributes:
    lengths: explicit padded lengths per feature, e.g. `{'inputs': [32, 64, 128, 512]}`, strictly
      increasing; the last must reach the feature's padded length (TASK_FEATURE_LENGTHS, or the
      longest example when eval/infer derive the lengths from the data). Features without explicit
      lengths get `num_buckets` lengths chosen from the data.
    features: which features to bucket (`'inputs'`, `'targets'`); default: the keys of `lengths`,
      else `'inputs'` (`'targets'` for decoder-only models).
    num_buckets: how many lengths to choose per feature when `lengths` does not give them. They
      minimise the expected padded length of the sampled examples; the feature's full padded length
      is added as a last bucket when the sample's longest example is shorter (it is only compiled
      if a batch needs it).
    multiple_of: chosen lengths are multiples of this (tile-friendly shapes).
    sample_size: how many examples are read to choose the lengths (the split's first examples in
      a fixed-seed shuffled order, the same in every process and every run; for eval/infer, the
      first window).
    shuffle_window: training only: emitted batches are shuffled within this many batches (seeded
      by the dataset seed; 0 or 1: emission order). Ignored when the dataset is not shuffled.
    window: eval/infer only: examples are grouped by bucket within windows of this many batches.
  """

  lengths: Optional[Mapping[str, Sequence[int]]] = None
  features: Optional[Sequence[str]] = None
  num_buckets: int = 4
  multiple_of: int = 8
  sample_size: int = 1000
  shuffle_window: int = 16
  window: int = 64

  def __post_init__(self):
    for name in ('num_buckets', 'multiple_of', 'sample_size', 'window'):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise BucketError(f'BucketConfig.{name} must be a positive integer, got {value!r}.')
    if not isinstance(self.shuffle_window, (int, np.integer)) or self.shuffle_window < 0:
      raise BucketError(
          f'BucketConfig.shuffle_window must be an integer >= 0, got {self.shuffle_window!r}.'
      )
    if self.features is not None:
      if isinstance(self.features, str) or not list(self.features):
        raise BucketError(
            f'BucketConfig.features must be a non-empty list of feature names from '
            f"{sorted(GROUP_PREFIXES)}, got {self.features!r} (e.g. features = ['inputs'])."
        )
      for f in self.features:
        _check_feature_name(f, 'BucketConfig.features')
    for feature, lengths in (self.lengths or {}).items():
      _check_feature_name(feature, 'BucketConfig.lengths')
      _check_increasing(feature, lengths)

  def bucketed_features(self, available: Sequence[str]) -> Tuple[str, ...]:
    """The features to bucket, given the features the model's batches have (`'inputs'`, ...)."""
    if self.features is not None:
      features = tuple(self.features)
    elif self.lengths:
      features = tuple(self.lengths)
    else:
      features = ('inputs',) if 'inputs' in available else ('targets',)
    missing = [f for f in features if f not in available]
    if missing:
      raise BucketError(
          f'Cannot bucket {missing}: the model batches have no such features (they have '
          f'{sorted(available)}; a decoder-only model has one decoder sequence, bucketed as '
          "'targets'). Set bucketing.BucketConfig.features to a subset of them."
      )
    return features


def _check_feature_name(feature: str, where: str) -> None:
  if feature not in GROUP_PREFIXES:
    raise BucketError(
        f'{where} names {feature!r}; bucketable features are {sorted(GROUP_PREFIXES)} (the '
        'TASK_FEATURE_LENGTHS keys of the encoder inputs and the decoder sequence).'
    )


def _check_increasing(feature: str, lengths: Sequence[int]) -> Tuple[int, ...]:
  if isinstance(lengths, (int, np.integer)) or lengths is None:
    raise BucketError(
        f'Bucket lengths of {feature!r} must be a list of lengths, got {lengths!r} (e.g. '
        f"lengths = {{'{feature}': [32, 64, 128]}})."
    )
  lengths = list(lengths)
  if not lengths:
    raise BucketError(
        f'The bucket list of {feature!r} is empty: give at least one length (its padded length, e.g. '
        f"lengths = {{'{feature}': [64, 128]}}), or drop {feature!r} from BucketConfig.lengths to "
        'have the lengths chosen from the data.'
    )
  if any(not isinstance(n, (int, np.integer)) or n < 1 for n in lengths) or any(
      b <= a for a, b in zip(lengths, lengths[1:])
  ):
    raise BucketError(
        f'Bucket lengths of {feature!r} must be positive integers in strictly increasing order, '
        f'got {lengths}.'
    )
  return tuple(int(n) for n in lengths)


# ----------------------------------------------------------------------------- lengths


def model_feature_groups(names: Iterable[str]) -> Dict[str, Tuple[str, ...]]:
  """`{'inputs': ('encoder_input_tokens', ...), 'targets': ('decoder_...', ...)}` of `names`
  (sequence features only: the caller passes the names of features with a length axis)."""
  out = {}
  for feature, prefix in GROUP_PREFIXES.items():
    members = tuple(sorted(n for n in names if n.startswith(prefix)))
    if members:
      out[feature] = members
  return out


def row_lengths(batch: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
  """Per row of `batch` (`[B, L]` features), 1 + the last position where any of `names` is nonzero."""
  out = None
  for name in names:
    x = np.asarray(batch[name])
    nonzero = x.reshape(x.shape[0], x.shape[1], -1).any(axis=-1) if x.ndim > 2 else x != 0
    length = np.where(nonzero.any(axis=1), x.shape[1] - np.argmax(nonzero[:, ::-1], axis=1), 0)
    out = length if out is None else np.maximum(out, length)
  return out


def choose_lengths(
    sample: Sequence[int], full_length: int, num_buckets: int, multiple_of: int = 8
) -> Tuple[int, ...]:
  """`num_buckets` padded lengths minimising the summed padded length of `sample` (exact DP).

  Lengths are rounded up to multiples of `multiple_of` (capped at `full_length`); the longest is
  the sample's longest (rounded), and `full_length` is appended when that is shorter, so every
  example fits some bucket.
  """
  sample = np.asarray(sample, np.int64).reshape(-1)
  if full_length < 1:
    raise BucketError(f'The padded length must be positive, got {full_length}.')
  if sample.size == 0:
    return (int(full_length),)
  rounded = np.minimum(-(-np.maximum(sample, 1) // multiple_of) * multiple_of, full_length)
  values, counts = np.unique(rounded, return_counts=True)
  m, k = len(values), min(num_buckets, len(values))
  # cost[j][i]: least summed padded length of the examples up to distinct value i with j + 1
  # buckets, the last at values[i].
  cum = np.concatenate([[0], np.cumsum(counts)])
  inf = np.iinfo(np.int64).max // 4
  cost = np.full((k, m), inf, np.int64)
  back = np.zeros((k, m), np.int64)
  cost[0] = values * cum[1:]
  for j in range(1, k):
    for i in range(j, m):
      # Previous bucket ends at t (j - 1 <= t < i); values t+1..i are padded to values[i].
      t = np.arange(j - 1, i)
      c = cost[j - 1, t] + values[i] * (cum[i + 1] - cum[t + 1])
      best = int(np.argmin(c))
      cost[j, i], back[j, i] = c[best], t[best]
  j = int(np.argmin(cost[:, m - 1]))  # fewer buckets when more would not help (never here)
  chosen, i = [], m - 1
  while j >= 0:
    chosen.append(int(values[i]))
    i, j = int(back[j, i]), j - 1
  chosen = sorted(chosen)
  if chosen[-1] < full_length:
    chosen.append(int(full_length))
  return tuple(chosen)


def check_lengths(
    feature: str, lengths: Sequence[int], full_length: int, source: str = 'TASK_FEATURE_LENGTHS'
) -> Tuple[int, ...]:
  """Validates explicit bucket lengths against the feature's padded length.

  Lengths above `full_length` are capped to it (a batch is never padded beyond seqio's length).
  A last bucket shorter than `full_length` is an error: longer examples would fit no bucket.
  """
  lengths = _check_increasing(feature, lengths)
  if lengths[-1] < full_length:
    lower = (
        f', or lower {source}[{feature!r}] to {lengths[-1]} (seqio then truncates longer {feature})'
        if source == 'TASK_FEATURE_LENGTHS'
        else ''
    )
    raise BucketError(
        f'The longest bucket of {feature!r} ({lengths[-1]}) is shorter than its padded length '
        f'{full_length} ({source}), so longer examples would fit no bucket. Add {full_length} as '
        f"the last bucket (e.g. lengths = {{'{feature}': {list(lengths) + [full_length]}}}){lower}."
    )
  capped = [n for n in lengths if n < full_length] + [int(full_length)]
  return tuple(capped)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """Resolved buckets: per bucketed feature, its padded lengths (increasing; the last is the
  feature's full padded length) and the model features that feature covers."""

  lengths: Mapping[str, Tuple[int, ...]]
  model_features: Mapping[str, Tuple[str, ...]]

  @property
  def features(self) -> Tuple[str, ...]:
    return tuple(sorted(self.lengths))

  @property
  def num_shapes(self) -> int:
    """How many padded shapes (compilations of a step) the buckets can produce at most."""
    return int(np.prod([len(v) for v in self.lengths.values()])) if self.lengths else 1

  def restrict(self, features: Sequence[str]) -> 'Buckets':
    keep = [f for f in self.features if f in features]
    return Buckets({f: self.lengths[f] for f in keep}, {f: self.model_features[f] for f in keep})

  def as_json(self) -> Dict[str, List[int]]:
    return {f: list(v) for f, v in sorted(self.lengths.items())}

  def describe(self) -> str:
    return ', '.join(f'{f}: {list(v)}' for f, v in sorted(self.lengths.items()))

  def keys(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """Bucket key (one int per row; equal keys = equal padded shape) of each row of `batch`."""
    key = None
    for f in self.features:
      n = row_lengths(batch, self.model_features[f])
      idx = np.searchsorted(np.asarray(self.lengths[f]), n, side='left')
      if np.any(idx >= len(self.lengths[f])):
        raise BucketError(
            f'An example has {int(n.max())} {f} tokens, more than the longest bucket '
            f'{self.lengths[f][-1]}.'
        )
      key = idx if key is None else key * len(self.lengths[f]) + idx
    return key

  def trim(self, batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`batch` with each bucketed feature cut to the shortest bucket that holds all its rows."""
    out = dict(batch)
    for f in self.features:
      names = self.model_features[f]
      longest = int(row_lengths(batch, names).max(initial=0))
      i = int(np.searchsorted(np.asarray(self.lengths[f]), longest, side='left'))
      if i >= len(self.lengths[f]):
        raise BucketError(
            f'A batch has {longest} {f} tokens, more than the longest bucket {self.lengths[f][-1]}.'
        )
      n = self.lengths[f][i]
      for name in names:
        out[name] = np.asarray(batch[name])[:, :n]
    return out


def resolve(
    config: BucketConfig,
    full_lengths: Mapping[str, int],
    model_features: Mapping[str, Sequence[str]],
    sample: Optional[Mapping[str, np.ndarray]] = None,
    source: str = 'TASK_FEATURE_LENGTHS',
) -> Buckets:
  """The `Buckets` of `config` for features padded to `full_lengths` (`{'inputs': 512, ...}`).

  `sample` (per feature, the real lengths of sampled examples) is needed for the features whose
  lengths `config` does not give.
  """
  features = config.bucketed_features(list(model_features))
  lengths = {}
  for f in features:
    if config.lengths and f in config.lengths:
      lengths[f] = check_lengths(f, config.lengths[f], int(full_lengths[f]), source)
    else:
      if sample is None or f not in sample:
        raise BucketError(f'No sample of {f!r} lengths to choose its buckets from.')
      lengths[f] = choose_lengths(
          sample[f], int(full_lengths[f]), config.num_buckets, config.multiple_of
      )
  return Buckets(lengths, {f: tuple(model_features[f]) for f in features})


# ----------------------------------------------------------------------------- training stream


def bucket_batches(
    ds,
    buckets: Buckets,
    batch_size: int,
    *,
    shuffle_window: int = 0,
    seed: Optional[int] = None,
):
  """Batches an unbatched, feature-converted `tf.data.Dataset` within buckets (training).

  Every batch holds `batch_size` examples of one bucket (a final incomplete batch of a finite
  dataset is dropped, as seqio drops it), with the bucketed features cut to the bucket's length
  (shape `[batch_size, None]` in the element spec). Deterministic given the input order and `seed`.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  features = buckets.features
  bounds = {f: tf.constant(buckets.lengths[f], tf.int32) for f in features}

  def length_of(ex, names, axis):
    """1 + the last nonzero position along `axis` of the named features (max over them)."""
    out = tf.constant(0, tf.int32) if axis == 0 else None
    for name in names:
      x = ex[name]
      nonzero = tf.not_equal(x, tf.zeros_like(x))
      while nonzero.shape.rank > axis + 1:
        nonzero = tf.reduce_any(nonzero, axis=-1)
      size = tf.shape(nonzero, out_type=tf.int32)[axis]
      positions = tf.range(1, size + 1, dtype=tf.int32)
      last = tf.reduce_max(tf.where(nonzero, positions, tf.zeros_like(positions)), axis=axis)
      out = last if out is None else tf.maximum(out, last)
    return out

  def bucket_of(f, n):
    idx = tf.searchsorted(bounds[f], tf.reshape(n, [1]), side='left')[0]
    return tf.minimum(idx, len(buckets.lengths[f]) - 1)

  def key_fn(ex):
    key = tf.constant(0, tf.int32)
    for f in features:
      key = key * len(buckets.lengths[f]) + bucket_of(
          f, length_of(ex, buckets.model_features[f], 0)
      )
    return tf.cast(key, tf.int64)

  def trim(batch):
    out = dict(batch)
    for f in features:
      names = buckets.model_features[f]
      longest = tf.reduce_max(length_of(batch, names, 1))
      n = tf.gather(bounds[f], bucket_of(f, longest))
      for name in names:
        out[name] = batch[name][:, :n]
    return out

  ds = ds.group_by_window(
      key_func=key_fn,
      reduce_func=lambda _, window: window.batch(batch_size, drop_remainder=True),
      window_size=batch_size,
  )
  ds = ds.map(trim, num_parallel_calls=None)
  if shuffle_window and shuffle_window > 1:
    ds = ds.shuffle(shuffle_window, seed=seed, reshuffle_each_iteration=False)
  return ds


# ----------------------------------------------------------------------------- eval / infer


def _stack(examples: Sequence[Mapping[str, Any]]) -> Dict[str, np.ndarray]:
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def sequence_features(example: Mapping[str, Any]) -> List[str]:
  """Names of an unbatched example's features that have a length axis."""
  return [k for k, v in example.items() if np.ndim(v) >= 1]


def bucket_host_examples(
    examples: Iterable[Tuple[int, Mapping[str, Any]]],
    batch_size: int,
    config: BucketConfig,
    allowed: Sequence[str] = tuple(GROUP_PREFIXES),
    buckets: Optional[Buckets] = None,
    source: str = 'the padded length of the batches: TASK_FEATURE_LENGTHS, or the longest example',
) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
  """Eval/infer batching: `(indices, batch)` with every batch from one bucket, trimmed.

  `examples` yields `(index, unbatched example)`; features all padded to the same lengths (a seqio
  feature converter's output). Only the features in `allowed` are bucketed (predictions keep the
  full `targets` length). Batches have at most `batch_size` rows (the last batch of a bucket may be
  short); each example is in exactly one batch. Unless `buckets` is given, they are resolved from
  the first window.
  """
  it = iter(examples)
  per_window = config.window * batch_size
  pending: Dict[int, List[Tuple[int, Mapping[str, Any]]]] = {}
  first = True
  while True:
    chunk = list(itertools.islice(it, per_window))
    if not chunk:
      break
    if first:
      first = False
      if buckets is None:
        stacked = _stack([e for _, e in chunk])
        groups = model_feature_groups(sequence_features(chunk[0][1]))
        groups = {f: v for f, v in groups.items() if f in allowed}
        wanted = [f for f in config.bucketed_features(list(model_feature_groups(stacked)))]
        groups = {f: v for f, v in groups.items() if f in wanted}
        if not groups:
          buckets = Buckets({}, {})
        else:
          head = {k: v[: config.sample_size] for k, v in stacked.items()}
          sample = {f: row_lengths(head, names) for f, names in groups.items()}
          full = {f: int(stacked[names[0]].shape[1]) for f, names in groups.items()}
          sub = dataclasses.replace(config, features=tuple(groups))
          buckets = resolve(sub, full, groups, sample, source=source)
    if not buckets.lengths:
      for start in range(0, len(chunk), batch_size):
        part = chunk[start : start + batch_size]
        yield np.asarray([i for i, _ in part]), _stack([e for _, e in part])
      continue
    keys = buckets.keys(_stack([e for _, e in chunk]))
    for key, item in zip(keys.tolist(), chunk):
      queue = pending.setdefault(key, [])
      queue.append(item)
      if len(queue) == batch_size:
        yield _emit(queue, buckets)
        pending[key] = []
  for key in sorted(pending):
    if pending[key]:
      yield _emit(pending[key], buckets)


def _emit(queue, buckets: Buckets) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  batch = _stack([e for _, e in queue])
  return np.asarray([i for i, _ in queue]), (buckets.trim(batch) if buckets.lengths else batch)


def padding_fraction(batches: Iterable[Mapping[str, np.ndarray]], names: Sequence[str]) -> float:
  """Fraction of the positions of the named `[B, L]` features that are padding (for reporting)."""
  real = total = 0
  for batch in batches:
    n = row_lengths(batch, names)
    real += int(n.sum())
    total += int(np.asarray(batch[names[0]]).shape[0] * np.asarray(batch[names[0]]).shape[1])
  return 1.0 - real / total if total else 0.0
