"""seqio feature converters that carry a per-example `prompt_ids` feature to the model.

With a prompt bank (`PromptEncoderDecoder(num_prompts=N)` / `PromptDecoderOnly(num_prompts=N)`) each
example names its prompt in an int `prompt_ids` feature, so one batch can mix tasks. seqio's
converters keep only the model features they know. These subclasses hand `prompt_ids` (a scalar, or
a length-1 vector, per example) to seqio as a pass-through feature and give the model one int per
example. Datasets without `prompt_ids` convert exactly as with seqio. Packing puts several examples
in one row, which cannot have one prompt each, so `prompt_ids` with `pack=True` is an error.

These are the models' default `FEATURE_CONVERTER_CLS` (`runtime/models.py`).
"""

from typing import Any, Mapping, Tuple

import seqio
import tensorflow as tf

PROMPT_IDS = 'prompt_ids'
_SPEC = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=1)


class _PromptIdsMixin:
  """Converts with a pass-through `prompt_ids` when the dataset has one (see the module docstring)."""

  _SEQIO_CLS: Any = None

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._init_args = (args, dict(kwargs))

  def _init_kwargs(self) -> Tuple[tuple, dict]:
    """This converter's constructor arguments, with `prompt_ids` added as a pass-through feature."""
    args, kwargs = self._init_args
    passthrough = dict(kwargs.get('passthrough_features') or {}, **{PROMPT_IDS: _SPEC})
    return args, dict(kwargs, passthrough_features=passthrough)

  def _with_prompt_ids(self, task_feature_lengths: Mapping[str, int]) -> seqio.FeatureConverter:
    """The seqio converter of this configuration, with `prompt_ids` as a pass-through feature."""
    del task_feature_lengths
    args, kwargs = self._init_kwargs()
    return self._SEQIO_CLS(*args, **kwargs)

  def __call__(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    if PROMPT_IDS not in ds.element_spec:
      return super().__call__(ds, task_feature_lengths)
    if self.pack:
      raise ValueError(
          'The dataset has a `prompt_ids` feature (one prompt per example), which cannot be packed: '
          'several examples would share a row. Set pack=False (utils.DatasetConfig.pack = False).'
      )
    shape = ds.element_spec[PROMPT_IDS].shape
    if shape.rank not in (0, 1) or (shape.rank == 1 and shape[0] not in (1, None)):
      raise ValueError(f'`prompt_ids` must be one integer per example, got shape {shape}.')
    ds = ds.map(
        lambda ex: dict(ex, **{PROMPT_IDS: tf.reshape(tf.cast(ex[PROMPT_IDS], tf.int32), [1])})
    )
    lengths = dict(task_feature_lengths, **{PROMPT_IDS: 1})
    converted = self._with_prompt_ids(task_feature_lengths)(ds, lengths)
    return converted.map(lambda ex: dict(ex, **{PROMPT_IDS: tf.reshape(ex[PROMPT_IDS], [])}))

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = {k: v for k, v in task_feature_lengths.items() if k != PROMPT_IDS}
    return super().get_model_feature_lengths(lengths)


class EncDecFeatureConverter(_PromptIdsMixin, seqio.EncDecFeatureConverter):
  """`seqio.EncDecFeatureConverter` that keeps a `prompt_ids` feature."""

  _SEQIO_CLS = seqio.EncDecFeatureConverter


class DecoderFeatureConverter(_PromptIdsMixin, seqio.DecoderFeatureConverter):
  """`seqio.DecoderFeatureConverter` (LM, or prefix LM with inputs) that keeps `prompt_ids`."""

  _SEQIO_CLS = seqio.DecoderFeatureConverter

  def _with_prompt_ids(self, task_feature_lengths: Mapping[str, int]) -> seqio.FeatureConverter:
    if 'inputs' in task_feature_lengths or 'suffixes' in task_feature_lengths:
      return super()._with_prompt_ids(task_feature_lengths)
    # seqio's DecoderFeatureConverter gives its plain-LM converter no pass-through features.
    args, kwargs = self._init_kwargs()
    kwargs.pop('loss_on_targets_only', None)
    return _LMFeatureConverter(*args, **kwargs)


class _LMFeatureConverter(seqio.LMFeatureConverter):
  """seqio's LM converter, which drops its pass-through features; this one keeps `prompt_ids`."""

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    example = dict(super()._convert_example(features))
    if PROMPT_IDS in features:
      example[PROMPT_IDS] = features[PROMPT_IDS]
    return example

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    if PROMPT_IDS in task_feature_lengths:
      lengths[PROMPT_IDS] = task_feature_lengths[PROMPT_IDS]
    return lengths
