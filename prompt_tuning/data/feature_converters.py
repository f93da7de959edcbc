"""seqio feature converters that carry per-example conditioning features to the model.

With a prompt bank (`PromptEncoderDecoder(num_prompts=N)`) each example names its prompt in an int
`prompt_ids` feature, so one batch can mix tasks; composed prompts and methods read other ids the
same way (`task_ids`, `lang_ids`, ...). seqio's converters keep only the model features they know.
These subclasses hand the declared conditioning features (`conditioning_features`, by default
`architectures.hooks.CONDITIONING_FEATURES`) that a dataset has to seqio as pass-through features
and give the model one int per example each. Datasets without them convert exactly as with
seqio. Packing puts several examples in one row, which cannot have one id each, so a conditioning
feature with `pack=True` is an error.

These are the models' default `FEATURE_CONVERTER_CLS` (`runtime/models.py`). To declare another
feature, bind `conditioning_features` of both the converter and the model, e.g. in gin
`feature_converters.EncDecFeatureConverter.conditioning_features = %CONDITIONING_FEATURES` and
`models.EncoderDecoderModel.conditioning_features = %CONDITIONING_FEATURES`.
"""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import seqio
import tensorflow as tf

from prompt_tuning.architectures import hooks

PROMPT_IDS = 'prompt_ids'
CONDITIONING_FEATURES = hooks.CONDITIONING_FEATURES
_SPEC = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=1)


class _ConditioningFeaturesMixin:
  """Converts with pass-through conditioning features when the dataset has them (module docstring)."""

  _SEQIO_CLS: Any = None

  def __init__(self, *args, conditioning_features: Sequence[str] = CONDITIONING_FEATURES, **kwargs):
    super().__init__(*args, **kwargs)
    self._init_args = (args, dict(kwargs))
    self.conditioning_features = tuple(conditioning_features or ())

  def _present(self, ds: tf.data.Dataset) -> Tuple[str, ...]:
    return tuple(k for k in self.conditioning_features if k in ds.element_spec)

  def _init_kwargs(self, names: Sequence[str]) -> Tuple[tuple, dict]:
    """This converter's constructor arguments, with `names` added as pass-through features."""
    args, kwargs = self._init_args
    passthrough = dict(kwargs.get('passthrough_features') or {}, **{k: _SPEC for k in names})
    return args, dict(kwargs, passthrough_features=passthrough)

  def _with_passthrough(
      self, task_feature_lengths: Mapping[str, int], names: Sequence[str]
  ) -> seqio.FeatureConverter:
    """The seqio converter of this configuration, with `names` as pass-through features."""
    del task_feature_lengths
    args, kwargs = self._init_kwargs(names)
    return self._SEQIO_CLS(*args, **kwargs)

  def __call__(
      self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
  ) -> tf.data.Dataset:
    names = self._present(ds)
    if not names:
      return super().__call__(ds, task_feature_lengths)
    if self.pack:
      raise ValueError(
          f'The dataset has per-example feature(s) {list(names)} (one id per example), which '
          'cannot be packed: several examples would share a row. Set pack=False '
          '(utils.DatasetConfig.pack = False).'
      )
    for name in names:
      shape = ds.element_spec[name].shape
      if shape.rank not in (0, 1) or (shape.rank == 1 and shape[0] not in (1, None)):
        raise ValueError(f'`{name}` must be one integer per example, got shape {shape}.')

    def to_vector(ex):
      return dict(ex, **{k: tf.reshape(tf.cast(ex[k], tf.int32), [1]) for k in names})

    def to_scalar(ex):
      return dict(ex, **{k: tf.reshape(ex[k], []) for k in names})

    lengths = dict(task_feature_lengths, **{k: 1 for k in names})
    converted = self._with_passthrough(task_feature_lengths, names)(ds.map(to_vector), lengths)
    return converted.map(to_scalar)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = {k: v for k, v in task_feature_lengths.items() if k not in self.conditioning_features}
    return super().get_model_feature_lengths(lengths)


class EncDecFeatureConverter(_ConditioningFeaturesMixin, seqio.EncDecFeatureConverter):
  """`seqio.EncDecFeatureConverter` that keeps the conditioning features (`prompt_ids`, ...)."""

  _SEQIO_CLS = seqio.EncDecFeatureConverter


class DecoderFeatureConverter(_ConditioningFeaturesMixin, seqio.DecoderFeatureConverter):
  """`seqio.DecoderFeatureConverter` (LM, or prefix LM with inputs) keeping conditioning features."""

  _SEQIO_CLS = seqio.DecoderFeatureConverter

  def _with_passthrough(
      self, task_feature_lengths: Mapping[str, int], names: Sequence[str]
  ) -> seqio.FeatureConverter:
    if 'inputs' in task_feature_lengths or 'suffixes' in task_feature_lengths:
      return super()._with_passthrough(task_feature_lengths, names)
    # seqio's DecoderFeatureConverter gives its plain-LM converter no pass-through features.
    args, kwargs = self._init_kwargs(names)
    kwargs.pop('loss_on_targets_only', None)
    return _LMFeatureConverter(*args, names=tuple(names), **kwargs)


class _LMFeatureConverter(seqio.LMFeatureConverter):
  """seqio's LM converter, which drops its pass-through features; this one keeps `names`."""

  def __init__(self, *args, names: Sequence[str] = (PROMPT_IDS,), **kwargs):
    super().__init__(*args, **kwargs)
    self._names = tuple(names)

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
    example = dict(super()._convert_example(features))
    for name in self._names:
      if name in features:
        example[name] = features[name]
    return example

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    for name in self._names:
      if name in task_feature_lengths:
        lengths[name] = task_feature_lengths[name]
    return lengths


def out_of_range_ids(
    mixture_or_task: Any,
    split: str,
    sizes: Mapping[str, int],
    max_examples: Optional[int] = 100_000,
) -> List[Tuple[str, str, List[int]]]:
  """Which tasks hold conditioning ids outside `sizes` (`{feature: number of ids}`).

  The ids are checked on every host batch (`models.*Model.check_conditioning_features`), which does
  not know the task of a row of a mixture; this reads the tasks' examples (up to `max_examples`
  each, unpreprocessed lengths) to name them in the error.

  Returns:
    `[(task name, feature, sorted out-of-range values)]`, in the mixture's task order.
  """
  provider = (
      seqio.get_mixture_or_task(mixture_or_task)
      if isinstance(mixture_or_task, str)
      else (mixture_or_task)
  )
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  found = []
  for task in tasks:
    if split not in task.splits:
      continue
    ds = task.get_dataset(
        sequence_length=None, split=split, shuffle=False, num_epochs=1, trim_output_features=False
    )
    names = [k for k in sizes if k in ds.element_spec]
    if not names:
      continue
    ds = ds.map(lambda ex: {k: tf.reshape(ex[k], [-1]) for k in names})
    if max_examples:
      ds = ds.take(max_examples)
    bad: Dict[str, set] = {k: set() for k in names}
    for ex in ds.as_numpy_iterator():
      for k in names:
        for v in ex[k].tolist():
          if v < 0 or v >= sizes[k]:
            bad[k].add(int(v))
    for k in names:
      if bad[k]:
        found.append((task.name, k, sorted(bad[k])))
  return found
