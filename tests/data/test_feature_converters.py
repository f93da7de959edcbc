"""`prompt_tuning.data.feature_converters`: seqio's converters plus a per-example `prompt_ids`.

Reference: seqio's own converters on the same examples (every model feature must be identical), and
the example a `prompt_ids` value was attached to (it must stay with that example, shuffled or not).
"""

import numpy as np
import pytest
import seqio
import tensorflow as tf

from prompt_tuning.data import feature_converters as fcs

RNG = np.random.default_rng(0)
# Example i starts with token 10 + i and belongs to prompt i % 3.
EXAMPLES = [
    {
        'inputs': np.array([10 + i] + list(RNG.integers(2, 9, size=i % 4)) + [1], np.int32),
        'targets': np.array(list(RNG.integers(2, 9, size=1 + i % 3)) + [1], np.int32),
        'prompt_ids': np.int32(i % 3),
    }
    for i in range(12)
]


def _dataset(ids_shape=(), with_ids=True):
  def gen():
    for ex in EXAMPLES:
      out = {'inputs': ex['inputs'], 'targets': ex['targets']}
      if with_ids:
        out['prompt_ids'] = np.reshape(ex['prompt_ids'], ids_shape)
      yield out

  signature = {
      'inputs': tf.TensorSpec((None,), tf.int32),
      'targets': tf.TensorSpec((None,), tf.int32),
  }
  if with_ids:
    signature['prompt_ids'] = tf.TensorSpec(ids_shape, tf.int32)
  return tf.data.Dataset.from_generator(gen, output_signature=signature)


CASES = [
    (fcs.EncDecFeatureConverter, seqio.EncDecFeatureConverter, {'inputs': 8, 'targets': 5}),
    (
        fcs.DecoderFeatureConverter,
        seqio.DecoderFeatureConverter,
        {'inputs': 8, 'targets': 5},
    ),  # prefix LM
    (fcs.DecoderFeatureConverter, seqio.DecoderFeatureConverter, {'targets': 6}),  # LM
]


@pytest.mark.parametrize('ours,theirs,lengths', CASES, ids=['encdec', 'prefix_lm', 'lm'])
@pytest.mark.parametrize('ids_shape', [(), (1,)], ids=['scalar', 'vector'])
def test_model_features_equal_seqio_and_prompt_ids_follow_their_example(
    ours, theirs, lengths, ids_shape
):
  if 'inputs' not in lengths:  # an LM task has no inputs: the targets carry the first token
    ds_fn = lambda: _dataset(ids_shape).map(lambda ex: {'targets': ex['inputs'], 'prompt_ids': ex['prompt_ids']})  # pylint: disable=unnecessary-lambda-assignment
  else:
    ds_fn = lambda: _dataset(ids_shape)  # pylint: disable=unnecessary-lambda-assignment
  expected = list(
      theirs(pack=False)(
          ds_fn().map(lambda ex: {k: v for k, v in ex.items() if k != 'prompt_ids'}), lengths
      ).as_numpy_iterator()
  )
  got = list(ours(pack=False)(ds_fn(), lengths).as_numpy_iterator())
  assert len(got) == len(EXAMPLES)
  for ex, ref, source in zip(got, expected, EXAMPLES):
    assert set(ex) == set(ref) | {'prompt_ids'}
    for k in ref:
      np.testing.assert_array_equal(ex[k], ref[k], err_msg=k)
    assert ex['prompt_ids'].shape == () and int(ex['prompt_ids']) == int(source['prompt_ids'])
  assert ours(pack=False).get_model_feature_lengths(lengths) == theirs(
      pack=False
  ).get_model_feature_lengths(lengths)


def test_prompt_ids_stay_with_their_example_when_shuffled():
  ds = _dataset().shuffle(12, seed=3, reshuffle_each_iteration=True).repeat(3)
  for ex in fcs.EncDecFeatureConverter(pack=False)(
      ds, {'inputs': 8, 'targets': 5}
  ).as_numpy_iterator():
    first = int(ex['encoder_input_tokens'][0])
    assert int(ex['prompt_ids']) == (first - 10) % 3


def test_without_prompt_ids_it_is_seqio_packing_included():
  lengths = {'inputs': 16, 'targets': 10}
  for pack in (False, True):
    ours = list(
        fcs.EncDecFeatureConverter(pack=pack)(_dataset(with_ids=False), lengths).as_numpy_iterator()
    )
    ref = list(
        seqio.EncDecFeatureConverter(pack=pack)(
            _dataset(with_ids=False), lengths
        ).as_numpy_iterator()
    )
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
      assert set(a) == set(b)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_prompt_ids_cannot_be_packed():
  with pytest.raises(ValueError, match='cannot be packed.*pack=False'):
    fcs.EncDecFeatureConverter(pack=True)(_dataset(), {'inputs': 8, 'targets': 5})
