"""Length bucketing (`prompt_tuning/data/bucketing.py`): bucket choice, trimming, the streams, errors.

References are independent: the bucket choice against brute force over all bucket sets, the
trimmed batches against the untrimmed examples (trimming may cut only zeros), the bucketed training
stream against the unbucketed one (same examples), and the multi-process rows against slices of
the one-process global batches.
"""

import collections
import itertools
import os
import sys

import numpy as np
import pytest

from prompt_tuning.data import bucketing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'runtime'))

LENGTHS = {'inputs': 24, 'targets': 8}


# ------------------------------------------------------------------------------- choice of lengths


def _brute_force(sample, full, k, multiple):
  rounded = np.minimum(-(-np.maximum(sample, 1) // multiple) * multiple, full)
  values = sorted(set(rounded.tolist()))
  best = None
  for r in range(1, min(k, len(values)) + 1):
    for subset in itertools.combinations(values[:-1], r - 1):
      bounds = list(subset) + [values[-1]]
      cost = sum(min(b for b in bounds if b >= x) for x in rounded)
      if best is None or cost < best[0]:
        best = (cost, bounds)
  return best[0]


def _cost(sample, lengths, multiple, full):
  rounded = np.minimum(-(-np.maximum(sample, 1) // multiple) * multiple, full)
  return sum(min(b for b in lengths if b >= x) for x in rounded)


@pytest.mark.parametrize('seed', range(6))
def test_chosen_lengths_minimise_padding_like_brute_force(seed):
  rng = np.random.default_rng(seed)
  full = 128
  sample = np.clip(rng.lognormal(3.0, 0.7, size=200).astype(int), 1, full)
  for k, multiple in ((1, 8), (3, 8), (4, 4), (5, 16)):
    lengths = bucketing.choose_lengths(sample, full, k, multiple)
    assert list(lengths) == sorted(set(lengths))
    assert lengths[-1] == full  # every example fits
    assert all(n % multiple == 0 or n == full for n in lengths)
    longest_sampled = -(-int(sample.max()) // multiple) * multiple
    useful = [n for n in lengths if n <= longest_sampled]
    assert len(useful) <= k
    assert _cost(sample, useful, multiple, full) == _brute_force(sample, full, k, multiple)


def test_chosen_lengths_edge_cases():
  assert bucketing.choose_lengths([], 64, 4) == (64,)
  assert bucketing.choose_lengths([3, 3, 3], 64, 4, 8) == (8, 64)
  assert bucketing.choose_lengths([64, 70], 64, 4, 8) == (64,)
  assert bucketing.choose_lengths([5, 9, 20], 24, 8, 1) == (5, 9, 20, 24)


def test_explicit_lengths_are_checked():
  assert bucketing.check_lengths('inputs', [8, 16, 24], 24) == (8, 16, 24)
  assert bucketing.check_lengths('inputs', [8, 64], 24) == (8, 24)  # capped at the padded length
  with pytest.raises(bucketing.BucketError, match=r'shorter than its padded length 24.*Add 24'):
    bucketing.check_lengths('inputs', [8, 16], 24)
  with pytest.raises(bucketing.BucketError, match='is empty'):
    bucketing.check_lengths('inputs', [], 24)
  with pytest.raises(bucketing.BucketError, match='strictly increasing'):
    bucketing.check_lengths('inputs', [16, 8, 24], 24)
  with pytest.raises(bucketing.BucketError, match='list of lengths'):
    bucketing.check_lengths('inputs', 24, 24)


def test_config_errors_name_the_cause():
  with pytest.raises(bucketing.BucketError, match='is empty'):
    bucketing.BucketConfig(lengths={'inputs': []})
  with pytest.raises(
      bucketing.BucketError, match="bucketable features are \\['inputs', 'targets'\\]"
  ):
    bucketing.BucketConfig(lengths={'encoder_input_tokens': [8, 24]})
  with pytest.raises(bucketing.BucketError, match='non-empty list'):
    bucketing.BucketConfig(features='inputs')
  with pytest.raises(bucketing.BucketError, match='num_buckets must be a positive'):
    bucketing.BucketConfig(num_buckets=0)
  with pytest.raises(bucketing.BucketError, match='decoder-only model'):
    bucketing.BucketConfig(features=['inputs']).bucketed_features(['targets'])
  assert bucketing.BucketConfig().bucketed_features(['inputs', 'targets']) == ('inputs',)
  assert bucketing.BucketConfig().bucketed_features(['targets']) == ('targets',)
  assert bucketing.BucketConfig(lengths={'targets': [4, 8]}).bucketed_features(
      ['inputs', 'targets']
  ) == ('targets',)


# ------------------------------------------------------------------------------- host batches


def _examples(n, full=24, targets=8, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.integers(1, full + 1))
    t = int(rng.integers(1, targets + 1))
    enc = np.zeros(full, np.int32)
    enc[:length] = rng.integers(2, 100, size=length)
    tgt = np.zeros(targets, np.int32)
    tgt[:t] = rng.integers(2, 100, size=t)
    out.append(
        (
            i,
            {
                'encoder_input_tokens': enc,
                'decoder_target_tokens': tgt,
                'decoder_input_tokens': np.concatenate([[0], tgt[:-1]]).astype(np.int32),
                'decoder_loss_weights': (tgt > 0).astype(np.float32),
                'prompt_ids': np.int32(i % 3),
            },
        )
    )
  return out


def test_row_lengths_match_a_python_reference():
  examples = [e for _, e in _examples(50)]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  ref = [max([0] + [j + 1 for j, t in enumerate(e['encoder_input_tokens']) if t]) for e in examples]
  np.testing.assert_array_equal(bucketing.row_lengths(batch, ['encoder_input_tokens']), ref)
  names = ['decoder_input_tokens', 'decoder_loss_weights', 'decoder_target_tokens']
  # The shifted decoder inputs reach one position further than the targets (seqio's layout too).
  ref = [max(int(np.nonzero(e[k])[0].max()) + 1 for k in names) for e in examples]
  assert any(
      r > int(np.nonzero(e['decoder_target_tokens'])[0].max()) + 1 for r, e in zip(ref, examples)
  )
  np.testing.assert_array_equal(bucketing.row_lengths(batch, names), ref)


@pytest.mark.parametrize('allowed', [('inputs',), ('inputs', 'targets')])
def test_host_batches_hold_every_example_once_within_one_bucket(allowed):
  examples = _examples(101)
  config = bucketing.BucketConfig(features=['inputs', 'targets'], num_buckets=3, window=2)
  seen = []
  shapes = set()
  for indices, batch in bucketing.bucket_host_examples(iter(examples), 4, config, allowed=allowed):
    assert 1 <= len(indices) <= 4
    shapes.add(
        tuple(batch['encoder_input_tokens'].shape[1:]) + batch['decoder_target_tokens'].shape[1:]
    )
    for row, i in enumerate(indices):
      seen.append(int(i))
      original = examples[i][1]
      for k, v in batch.items():
        full = original[k]
        if np.ndim(full):
          n = v.shape[1]
          np.testing.assert_array_equal(v[row], full[:n])
          assert not np.any(full[n:]), f'{k}: trimming cut a real token'
        else:
          assert v[row] == full
    if 'targets' not in allowed:
      assert batch['decoder_target_tokens'].shape[1] == 8
  assert sorted(seen) == list(range(101))
  # A handful of shapes (at most 4 input buckets x 2 target buckets), not one per batch.
  assert 1 < len(shapes) <= 8


def test_host_batches_keep_dataset_order_within_a_bucket():
  examples = _examples(64)
  config = bucketing.BucketConfig(lengths={'inputs': [12, 24]})
  for indices, _ in bucketing.bucket_host_examples(iter(examples), 8, config):
    assert list(indices) == sorted(indices)


def test_host_batches_without_allowed_features_are_plain_batches():
  examples = _examples(10)
  config = bucketing.BucketConfig(features=['targets'])
  out = list(bucketing.bucket_host_examples(iter(examples), 4, config, allowed=('inputs',)))
  assert [list(i) for i, _ in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
  assert out[0][1]['encoder_input_tokens'].shape == (4, 24)


def test_explicit_lengths_too_short_for_the_data_fail_clearly():
  config = bucketing.BucketConfig(lengths={'inputs': [8, 16]})
  with pytest.raises(bucketing.BucketError, match='longer examples would fit no bucket'):
    list(bucketing.bucket_host_examples(iter(_examples(20)), 4, config))


# ------------------------------------------------------------------------------- training stream


@pytest.fixture(scope='module')
def tiny():
  import tiny_task  # pylint: disable=g-import-not-at-top
  from prompt_tuning.data import feature_converters  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  def cfg(**kw):
    base = dict(
        mixture_or_task_name='tiny_count',
        task_feature_lengths=LENGTHS,
        split='train',
        batch_size=4,
        shuffle=True,
        seed=0,
        bucketing=bucketing.BucketConfig(num_buckets=3, multiple_of=2),
    )
    base.update(kw)
    return utils.DatasetConfig(**base)

  del tiny_task
  return utils, cfg, feature_converters.EncDecFeatureConverter


def _take(ds, n):
  return list(ds.take(n).as_numpy_iterator())


def _rows(batches, full):
  """Each row of each batch padded back to the full lengths, as a hashable tuple."""
  rows = []
  for b in batches:
    for r in range(b['encoder_input_tokens'].shape[0]):
      row = []
      for k in sorted(b):
        v = b[k][r]
        width = full.get(k, v.shape[0] if v.ndim else 0)
        padded = np.zeros(width, v.dtype) if v.ndim else v
        if v.ndim:
          padded[: v.shape[0]] = v
        row.append((k, tuple(np.atleast_1d(padded).tolist())))
      rows.append(tuple(row))
  return rows


def test_bucketed_stream_holds_the_same_examples_trimmed_exactly(tiny):
  utils, cfg, fc = tiny
  full = {
      'encoder_input_tokens': 24,
      'decoder_input_tokens': 8,
      'decoder_target_tokens': 8,
      'decoder_loss_weights': 8,
  }
  plain = _take(utils.get_dataset(cfg(bucketing=None, batch_size=1), 0, 1, fc, num_epochs=1), 1000)
  bucketed = _take(utils.get_dataset(cfg(), 0, 1, fc, num_epochs=1), 1000)
  assert len(plain) == 64
  lengths = utils.resolve_buckets(cfg(), fc).lengths['inputs']
  for b in bucketed:
    n = b['encoder_input_tokens'].shape[1]
    assert n in lengths
    real = bucketing.row_lengths(b, ['encoder_input_tokens'])
    assert real.max() <= n
    assert lengths.index(n) == 0 or real.min() > lengths[lengths.index(n) - 1]  # one bucket
    assert b['decoder_target_tokens'].shape == (4, 8)  # targets are not bucketed by default
  # The same examples as the unbucketed stream: all but those left in incomplete buckets (fewer
  # than batch_size per bucket, dropped at the end of the epoch as seqio drops a last partial batch).
  plain_rows = collections.Counter(_rows(plain, full))
  bucketed_rows = collections.Counter(_rows(bucketed, full))
  assert not bucketed_rows - plain_rows
  assert sum((plain_rows - bucketed_rows).values()) < 4 * len(lengths)
  assert len({b['encoder_input_tokens'].shape for b in bucketed}) > 1


def test_bucketed_stream_is_deterministic_and_skip_resumes_it(tiny):
  utils, cfg, fc = tiny

  def stream(seed, skip=0, n=12):
    ds = utils.get_dataset(cfg(seed=None), 0, 1, fc, num_epochs=None, seed=seed)
    return _take(ds.skip(skip), n)

  first, again = stream(0), stream(0)
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  resumed = stream(0, skip=5, n=7)
  for a, b in zip(first[5:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  other = stream(1)
  assert any(
      a['encoder_input_tokens'].shape != b['encoder_input_tokens'].shape
      or not np.array_equal(a['encoder_input_tokens'], b['encoder_input_tokens'])
      for a, b in zip(first, other)
  )


def test_every_process_keeps_its_rows_of_the_same_global_batch(tiny):
  """Two processes (data shards) of a batch-8 run: same bucket per step, their rows of the global
  batch that a one-process run reads."""
  utils, cfg, fc = tiny
  c = cfg(batch_size=8)
  one = _take(utils.get_dataset(c, 0, 1, fc, num_epochs=None), 10)
  shards = [_take(utils.get_dataset(c, i, 2, fc, num_epochs=None), 10) for i in (0, 1)]
  for g, s0, s1 in zip(one, *shards):
    for k in g:
      assert s0[k].shape == s1[k].shape == (4,) + g[k].shape[1:]
      np.testing.assert_array_equal(np.concatenate([s0[k], s1[k]]), g[k])


def test_bucket_lengths_are_chosen_deterministically_and_pinned(tiny):
  utils, cfg, fc = tiny
  a, b = utils.resolve_buckets(cfg(), fc), utils.resolve_buckets(cfg(seed=5), fc)
  assert a == b  # the sample's seed is fixed, not the run's
  assert a.lengths['inputs'][-1] == 24
  pinned = utils.with_buckets(cfg(), a)
  assert pinned.bucketing.lengths == {'inputs': list(a.lengths['inputs'])}
  assert utils.resolve_buckets(pinned, fc) == a


def test_dataset_config_errors(tiny):
  utils, cfg, fc = tiny
  with pytest.raises(bucketing.BucketError, match='packing'):
    utils.get_dataset(cfg(pack=True), 0, 1, fc)
  with pytest.raises(bucketing.BucketError, match='shard_data_source'):
    utils.get_dataset(cfg(batch_size=8, shard_data_source=True), 0, 2, fc)
  with pytest.raises(bucketing.BucketError, match=r"TASK_FEATURE_LENGTHS\['inputs'\] to 16"):
    utils.get_dataset(cfg(bucketing=bucketing.BucketConfig(lengths={'inputs': [8, 16]})), 0, 1, fc)
