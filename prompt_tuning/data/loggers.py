"""A seqio logger that shows predictions next to their inputs in TensorBoard.

`PredictionSamplesLogger` works with any task (its postprocessor may or may not
return `*_examples` dicts). At every evaluation it writes two text summaries
per task into `<output_dir>/<task_name>` (the directory seqio's
`TensorBoardLogger` uses, so they sit next to the scalar metrics):

* `examples/random`: a random sample of predictions;
* `examples/wrong`: a random sample of the predictions that missed their target.

Each entry shows the input text, the target text, the raw prediction and, when
they differ from the raw texts, the postprocessed target and prediction.
Use it like seqio's loggers, e.g. in gin:
`seqio.Evaluator.logger_cls = [@seqio.TensorBoardLogger, @loggers.PredictionSamplesLogger]`
(with `prompt_tuning.data.loggers` imported).
"""

from absl import logging
import os
import random
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from prompt_tuning.data import metrics as pt_metrics
from prompt_tuning.data import utils

RANDOM_TAG = 'examples/random'


class PyLoggingLogger(seqio.Logger):
  """seqio's `PyLoggingLogger` without its "at step -1" for step 0 (offline evaluation).

  Logs `<task>/<metric> at step <step>: <value>` for scalar and text metrics.
  """

  def __call__(
      self,
      task_name: str,
      step: Optional[int],
      metrics: Mapping[str, Any],
      dataset: Optional[tf.data.Dataset],
      inferences: Optional[Mapping[str, Sequence[Any]]],
      targets: Optional[Sequence[Any]],
  ) -> None:
    del dataset, inferences, targets
    where = f' at step {int(step)}' if step is not None else ''
    for name, value in metrics.items():
      if isinstance(value, seqio.metrics.Scalar):
        text = f'{float(np.asarray(value.value)):.3f}'
      elif isinstance(value, seqio.metrics.Text):
        text = value.textdata
      else:
        continue
      logging.info('%s/%s%s: %s', task_name, name, where, text)


WRONG_TAG = 'examples/wrong'


def _markdown_escape(text: str) -> str:
  """Keeps markdown from eating `*`, `_`, `<...>` of model text."""
  for ch in ('\\', '*', '_', '`', '<', '>', '#', '|'):
    text = text.replace(ch, '\\' + ch)
  return text


def _show(value: Any) -> str:
  value = utils.to_text(value)
  if isinstance(value, Mapping):
    value = {k: utils.to_text(v) for k, v in value.items()}
  return _markdown_escape(str(value))


@gin.configurable
class PredictionSamplesLogger(seqio.Logger):
  """Writes TensorBoard text samples (random and wrong) of each task's predictions."""

  def __init__(self, output_dir: str, num_examples: int = 8, seed: int = 0, max_chars: int = 2000):
    """Creates the logger.

    Args:
      output_dir: base directory of the summaries (one sub-directory per task).
      num_examples: examples per summary (-1: all).
      seed: base of the per-(task, step) sampling seed.
      max_chars: longer input texts are cut to this many characters.
    """
    super().__init__(output_dir)
    self.num_examples = num_examples
    self.seed = seed
    self.max_chars = max_chars
    self._writers: Dict[str, tf.summary.SummaryWriter] = {}

  def _writer(self, task_name: str) -> tf.summary.SummaryWriter:
    path = os.path.join(self.output_dir, task_name)
    if path not in self._writers:
      self._writers[path] = tf.summary.create_file_writer(path)
    return self._writers[path]

  def _clip(self, text: str) -> str:
    if self.max_chars and len(text) > self.max_chars:
      return text[: self.max_chars] + ' [...]'
    return text

  def _format(self, entry: Mapping[str, Any]) -> str:
    lines = [
        f'**input:** {self._clip(_show(entry["input"]))}',
        f'**target:** {_show(entry["target_text"])}',
        f'**prediction:** {_show(entry["prediction_text"])}',
    ]
    if _show(entry['target']) != _show(entry['target_text']):
      lines.append(f'**target (postprocessed):** {_show(entry["target"])}')
    if _show(entry['prediction']) != _show(entry['prediction_text']):
      lines.append(f'**prediction (postprocessed):** {_show(entry["prediction"])}')
    return '\n\n'.join(lines)

  @staticmethod
  def collect(
      dataset: Optional[tf.data.Dataset],
      inferences: Optional[Mapping[str, Sequence[Any]]],
      targets: Optional[Sequence[Any]],
  ) -> List[Dict[str, Any]]:
    """Aligns dataset examples, raw and postprocessed predictions and targets."""
    inferences = inferences or {}
    predictions = inferences.get('prediction')
    outputs = inferences.get('output')
    if predictions is None and outputs is None:
      return []
    n = len(predictions if predictions is not None else outputs)
    examples: List[Mapping[str, Any]] = []
    if dataset is not None:
      examples = list(dataset.take(n).as_numpy_iterator())
    entries = []
    for i in range(n):
      ex = examples[i] if i < len(examples) else {}
      prediction = predictions[i] if predictions is not None else outputs[i]
      output = outputs[i] if outputs is not None else None
      if isinstance(prediction, Mapping) and utils.PREDICTION in prediction:
        if output is None:
          output = prediction.get(utils.PREDICTION_TEXT)
        prediction = prediction[utils.PREDICTION]
      target_text = ex.get(utils.TARGET_TEXT)
      entries.append(
          {
              'input': utils.to_text(ex.get(utils.INPUT_TEXT, '')),
              'target_text': utils.to_text(target_text) if target_text is not None else '',
              'target': targets[i] if targets is not None and i < len(targets) else target_text,
              'prediction_text': utils.to_text(output) if output is not None else prediction,
              'prediction': prediction,
          }
      )
    return entries

  def __call__(
      self,
      task_name: str,
      step: Optional[int],
      metrics: Mapping[str, seqio.metrics.MetricValue],
      dataset: Optional[tf.data.Dataset],
      inferences: Optional[Mapping[str, Sequence[Any]]],
      targets: Optional[Sequence[Any]],
  ) -> None:
    """Writes the `examples/random` and `examples/wrong` text summaries."""
    del metrics
    step = -1 if step is None else int(step)
    entries = self.collect(dataset, inferences, targets)
    if not entries:
      return
    rng = random.Random(zlib.crc32(f'{self.seed}/{task_name}/{step}'.encode()))
    wrong = [e for e in entries if pt_metrics.is_wrong(e['target'], e['prediction'])]
    separator = '\n\n---\n\n'
    random_text = separator.join(
        self._format(entries[i]) for i in pt_metrics.safe_sample(self.num_examples, entries, rng)
    )
    wrong_text = separator.join(
        self._format(wrong[i]) for i in pt_metrics.safe_sample(self.num_examples, wrong, rng)
    )
    header = f'{len(wrong)} of {len(entries)} predictions are wrong.\n\n'
    writer = self._writer(task_name)
    with writer.as_default():
      tf.summary.text(RANDOM_TAG, tf.constant(random_text), step=step)
      tf.summary.text(WRONG_TAG, tf.constant(header + (wrong_text or '(none)')), step=step)
    writer.flush()


def read_text_summaries(log_dir: str) -> Dict[str, Dict[int, str]]:
  """Reads the text summaries of a TensorBoard event directory: {tag: {step: text}}."""
  out: Dict[str, Dict[int, str]] = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(log_dir, 'events.out.tfevents.*'))):
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        if value.HasField('tensor'):
          tensor = tf.make_ndarray(value.tensor)
          text = tensor.item() if isinstance(tensor, np.ndarray) else tensor
          out.setdefault(value.tag, {})[event.step] = utils.to_text(text)
  return out
