"""scripts/plot_metrics.py reads TensorBoard event files without TensorFlow: the same scalars as
TensorFlow's own reader (`summary_iterator`), from nested directories, tensor and simple values,
and a file whose last record was cut short (a writer killed mid-write) up to that record; and it
never imports TensorFlow (4 s, and its start-up lines in the demo's report)."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))
import plot_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tf_scalars(log_dir):
  """The reference: TensorFlow's reader, the same tag naming as the script."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out = {}
  for path in glob.glob(os.path.join(log_dir, '**', 'events.out.tfevents.*'), recursive=True):
    rel = os.path.relpath(os.path.dirname(path), log_dir)
    try:
      for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
          if value.HasField('simple_value'):
            v = value.simple_value
          elif value.HasField('tensor') and tf.make_ndarray(value.tensor).dtype.kind in 'fiu':
            v = float(tf.make_ndarray(value.tensor))
          else:
            continue
          tag = value.tag if rel == '.' else f'{rel}/{value.tag}'
          out.setdefault(tag, {})[int(event.step)] = float(v)
    except tf.errors.DataLossError:
      pass  # a record cut short ends the file
  return {t: sorted(s.items()) for t, s in out.items()}


@pytest.fixture(scope='module')
def log_dir(tmp_path_factory):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('events')
  rng = np.random.default_rng(0)
  for sub, tags in (('train', ('loss', 'learning_rate')), ('inference_eval/task', ('accuracy',))):
    writer = tf.summary.create_file_writer(str(root / sub))
    with writer.as_default():
      for step in range(1, 41):
        for tag in tags:
          tf.summary.scalar(tag, float(rng.normal()), step=step)
      tf.summary.text('samples', 'not a number', step=40)
    writer.close()
  # A TF1-style event with a simple_value, as older writers and T5X's logs have.
  legacy = root / 'legacy'
  legacy.mkdir()
  with tf.compat.v1.io.TFRecordWriter(str(legacy / 'events.out.tfevents.1.host')) as w:
    for step in (5, 10):
      summary = tf.compat.v1.Summary(
          value=[tf.compat.v1.Summary.Value(tag='old', simple_value=step / 2)]
      )
      w.write(tf.compat.v1.Event(step=step, summary=summary).SerializeToString())
  return root


def test_reads_what_tensorflow_reads(log_dir):
  ours = plot_metrics.read_scalars(str(log_dir))
  assert ours == _tf_scalars(str(log_dir))
  assert sorted(ours) == [
      'inference_eval/task/accuracy',
      'legacy/old',
      'train/learning_rate',
      'train/loss',
  ]
  assert [s for s, _ in ours['train/loss']] == list(range(1, 41))
  assert ours['legacy/old'] == [(5, 2.5), (10, 5.0)]


def test_a_record_cut_short_ends_the_file(log_dir, tmp_path):
  (src,) = glob.glob(str(log_dir / 'train' / 'events.out.tfevents.*'))
  data = open(src, 'rb').read()
  cut = tmp_path / 'train'
  cut.mkdir()
  with open(cut / os.path.basename(src), 'wb') as f:
    f.write(data[: len(data) - 7])  # the last record loses its end
  ours = plot_metrics.read_scalars(str(tmp_path))
  full = plot_metrics.read_scalars(str(log_dir))
  assert ours == _tf_scalars(str(tmp_path))
  # Only the last record (step 40's text) is lost: every scalar is still there.
  assert ours['train/loss'] == full['train/loss']


def test_reading_does_not_import_tensorflow(log_dir):
  code = (
      'import sys; import plot_metrics; '
      f'n = len(plot_metrics.read_scalars({str(log_dir)!r})); '
      "print(n, 'tensorflow' in sys.modules)"
  )
  env = dict(os.environ, PYTHONPATH=os.path.join(REPO, 'scripts'))
  out = subprocess.run(
      [sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.split() == ['4', 'False'], out.stdout + out.stderr
