"""seqio postprocessors: model output strings -> values the metrics compare.

seqio calls a task's `postprocess_fn(text, example=ex, is_target=bool)` once
per target (with `is_target=True`) and once per prediction; `ex` is the
preprocessed example as numpy (strings as bytes). Every function here accepts
that call.

* `string_label_to_class_id`: class name -> index, unknown text -> -1.
* `string_to_float`: STS-B, unparsable text -> -1.0.
* `multirc`, `record`, `qa`, `wsc_simple`: T5's postprocessors for those tasks
  (dicts with a `value` and, for targets, the `group` the metrics aggregate by).
* `postprocess_with_examples`: the `*_examples` tasks; wraps any of the above
  so a prediction becomes a dict with the postprocessed value (`prediction`),
  the raw output (`prediction_pretokenized`) and example fields such as
  `inputs_pretokenized` / `targets_pretokenized`, so metrics and loggers can
  show inputs. Targets stay plain values.
* `translate_labels`, `qqp_to_mrpc`, `mrpc_to_qqp`: zero-shot transfer; map the
  label words of the task a prompt was trained on to the evaluated task's.
* `sequential`: chain postprocessors.
"""

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

from prompt_tuning.data import utils

PostprocessFn = Callable[..., Any]

# Label names of T5's (TFDS's) QQP and MRPC configs.
QQP_LABELS = ('not_duplicate', 'duplicate')
MRPC_LABELS = ('not_equivalent', 'equivalent')


def _text(x: Any) -> str:
  x = utils.to_text(x)
  return x if isinstance(x, str) else str(x)


def string_label_to_class_id(
    string_label: Any, label_classes: Sequence[str], default: int = -1, **unused_kwargs
) -> int:
  """Index of `string_label` in `label_classes`, or `default` when absent."""
  string_label = _text(string_label)
  label_classes = list(label_classes)
  return label_classes.index(string_label) if string_label in label_classes else default


def string_to_float(string: Any, default: float = -1.0, **unused_kwargs) -> float:
  """`float(string)`, or `default` when it does not parse (e.g. '<unk>')."""
  try:
    return float(_text(string))
  except ValueError:
    return default


def multirc(
    string_label: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False
) -> Mapping[str, Any]:
  """MultiRC answer correctness as {'value': 0|1|-1}, targets add their question group."""
  result = {'value': string_label_to_class_id(string_label, label_classes=('False', 'True'))}
  if is_target and example is not None:
    result['group'] = utils.to_text(example['idx/question'])
  return result


def record(
    answer: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False
) -> Mapping[str, Any]:
  """ReCoRD: targets are {'value': all gold answers, 'group': (passage, query)}."""
  if is_target and example is not None:
    return {
        'value': [_text(a) for a in utils.to_text(example['answers'])],
        'group': (utils.to_text(example['idx/passage']), utils.to_text(example['idx/query'])),
    }
  return {'value': _text(answer)}


def qa(answer: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> Any:
  """QA: a prediction stays its string; a target becomes the list of gold answers."""
  if is_target and example is not None and 'answers' in example:
    return [_text(a) for a in utils.to_text(example['answers'])]
  return _text(answer)


_DETERMINERS = frozenset(
    {
        'a',
        'an',
        'few',
        'her',
        'his',
        'each',
        'every',
        'many',
        'much',
        'my',
        'our',
        'some',
        'that',
        'the',
        'their',
        'these',
        'this',
        'those',
        'which',
        'whose',
        'your',
    }
)


def _clean_referent(s: str) -> str:
  """Lower-cases and drops determiners (T5's WSC referent comparison)."""
  s = s.strip().lower()
  return ' '.join(w for w in s.split(' ') if w not in _DETERMINERS)


def wsc_simple(
    prediction: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False
) -> int:
  """Simple WSC: 1 if the predicted referent is the candidate, else 0 (-1 if empty).

  Targets are the example's label (1 when the candidate is the referent), so
  accuracy counts a prediction as right when "predicted the candidate" equals
  "the candidate is correct".
  """
  if is_target:
    return int(utils.to_text(example['label']))
  prediction = _clean_referent(_text(prediction))
  if not prediction:
    return -1
  referent = _clean_referent(_text(example['targets_pretokenized']))
  if ("'" in prediction) != ("'" in referent):
    predicted_referent = False
  else:
    prediction_words = set(prediction.split(' '))
    referent_words = set(referent.split(' '))
    predicted_referent = prediction_words.issubset(referent_words) or referent_words.issubset(
        prediction_words
    )
  return int(predicted_referent)


def get_glue_postprocess_fn(
    config_name: str, label_classes: Optional[Sequence[str]] = None
) -> PostprocessFn:
  """T5's postprocessor for a GLUE/SuperGLUE TFDS config."""
  if config_name == 'stsb':
    return string_to_float
  if config_name == 'multirc':
    return multirc
  if config_name == 'record':
    return record
  if label_classes is None:
    raise ValueError(f'{config_name!r} needs its label classes.')
  return functools.partial(string_label_to_class_id, label_classes=tuple(label_classes))


def postprocess_with_examples(
    postprocess_func: PostprocessFn,
    decoded_model_output: Any,
    prediction_field: str = utils.PREDICTION,
    prediction_text_field: str = utils.PREDICTION_TEXT,
    example_fields: Sequence[str] = (utils.INPUT_TEXT, utils.TARGET_TEXT),
    decoded_model_output_field: Optional[str] = None,
    **kwargs,
) -> Any:
  """Runs `postprocess_func` and, for predictions, keeps example information.

  Args:
    postprocess_func: the task's real postprocessor.
    decoded_model_output: the decoded text (or, with
      `decoded_model_output_field`, a dict from an earlier postprocessor).
    prediction_field: key of the postprocessed prediction.
    prediction_text_field: key of the raw model output.
    example_fields: keys copied from `example` (strings decoded to `str`).
    decoded_model_output_field: when the input is a dict, the key holding the
      model output; its other keys can supply `example_fields`.
    **kwargs: seqio's `example=` and `is_target=`.

  Returns:
    For targets: `postprocess_func(target)`. For predictions:
    {prediction_field: ..., prediction_text_field: ..., <example_fields>...}.
  """
  is_target = kwargs.get('is_target', False)
  context = {}
  if decoded_model_output_field is not None and not is_target:
    context = decoded_model_output
    decoded_model_output = decoded_model_output[decoded_model_output_field]
  if is_target:
    return postprocess_func(decoded_model_output, **kwargs)
  example = kwargs.get('example') or {}
  result = {
      prediction_field: postprocess_func(decoded_model_output, **kwargs),
      prediction_text_field: _text(decoded_model_output),
  }
  for field in example_fields:
    value = example[field] if field in example else context.get(field)
    result[field] = utils.to_text(value)
  return result


def with_examples(
    postprocess_func: PostprocessFn,
    example_fields: Sequence[str] = (utils.INPUT_TEXT, utils.TARGET_TEXT),
) -> PostprocessFn:
  """`postprocess_with_examples` bound to `postprocess_func` (a seqio postprocess_fn)."""
  return functools.partial(
      postprocess_with_examples, postprocess_func, example_fields=tuple(example_fields)
  )


def sequential(*funcs: PostprocessFn) -> PostprocessFn:
  """Chains postprocessors; each receives the previous output and the same kwargs."""

  def execute(x, *args, **kwargs):
    for fn in funcs:
      x = fn(x, *args, **kwargs)
    return x

  return execute


def translate_labels(mapping: Mapping[str, str]) -> PostprocessFn:
  """A postprocessor that rewrites whole label words (`mapping`), other text unchanged.

  Applied to predictions and to targets alike, so it must leave the evaluated
  task's own labels untouched (they are not keys of `mapping`).
  """
  mapping = dict(mapping)

  def translate(decoded_model_output: Any, *args, **kwargs) -> Any:
    del args, kwargs  # seqio's example=/is_target= are not needed
    text = utils.to_text(decoded_model_output)
    if isinstance(text, str):
      return mapping.get(text.strip(), text)
    return decoded_model_output

  return translate


# A prompt trained on QQP answers duplicate/not_duplicate; MRPC's labels are
# equivalent/not_equivalent (and vice versa).
qqp_to_mrpc = translate_labels(dict(zip(QQP_LABELS, MRPC_LABELS)))
mrpc_to_qqp = translate_labels(dict(zip(MRPC_LABELS, QQP_LABELS)))


def remove_extra_id_0(decoded_model_output: Any, *args, **kwargs) -> str:
  """Drops a leading `<extra_id_0>` (outputs of span-corruption checkpoints)."""
  del args, kwargs
  return utils.remove_prefix(_text(decoded_model_output), utils.EXTRA_ID_0).lstrip()
