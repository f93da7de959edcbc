"""Small helpers shared by the data pieces and the task modules.

Holds the dictionary key names the postprocessors, metrics and loggers agree
on, the task -> index mapping used by `task_index_*` tasks, T5's
examples-proportional mixing rate, and idempotent registration helpers.
"""

from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import seqio

# Keys of the dicts that `postprocessors.postprocess_with_examples` returns.
PREDICTION = 'prediction'
PREDICTION_TEXT = 'prediction_pretokenized'
INPUT_FIELD = 'inputs'
INPUT_TEXT = 'inputs_pretokenized'
TARGET_FIELD = 'targets'
TARGET_TEXT = 'targets_pretokenized'
CONTEXT_TEXT = 'context'
QUESTION_TEXT = 'question'
ANSWERS_TEXT = 'answers'
EXTRA_ID_0 = '<extra_id_0>'
UNKNOWN_LABEL = '<unk>'

TaskOrName = Union[str, seqio.Task, seqio.Mixture]
RateSpec = Union[float, Callable[..., float]]


def identity(x: Any, *args, **kwargs) -> Any:  # pylint: disable=unused-argument
  """Postprocessor that returns its input (accepts seqio's keyword arguments)."""
  return x


def task_mapping(
    tasks: Iterable[str], aliases: Optional[Mapping[str, str]] = None
) -> Dict[str, int]:
  """Maps task names to indices in sorted-name order; aliases share an index.

  Args:
    tasks: task names. Names that are keys of `aliases` are removed before the
      remaining names are sorted and numbered.
    aliases: alias -> task, e.g. {'axb': 'rte'} so a diagnostic set reuses the
      prompt of the task it is cast as.

  Returns:
    {task: index} including the aliases.

  Raises:
    ValueError: if an alias points at a task that is not in `tasks`.
  """
  aliases = dict(aliases or {})
  names = set(tasks) - set(aliases)
  index = {name: i for i, name in enumerate(sorted(names))}
  for alias, target in aliases.items():
    if target not in index:
      raise ValueError(
          f'Task alias {alias!r} -> {target!r}: {target!r} is not one of '
          f'the tasks {sorted(names)}.'
      )
    index[alias] = index[target]
  return index


def remove_prefix(s: str, prefix: str) -> str:
  """Returns `s` without `prefix` when it starts with it."""
  return s[len(prefix) :] if prefix and s.startswith(prefix) else s


def remove_suffix(s: str, suffix: str) -> str:
  """Returns `s` without `suffix` when it ends with it."""
  return s[: -len(suffix)] if suffix and s.endswith(suffix) else s


def to_text(x: Any) -> Any:
  """Decodes bytes (and numpy/TF string containers of them) to `str`.

  Scalars become `str`, arrays and lists become lists, dicts are decoded value
  by value; anything else (numbers, None) is returned unchanged, numpy scalars
  as Python ones.
  """
  if hasattr(x, 'numpy') and callable(x.numpy):  # eager tf.Tensor
    x = x.numpy()
  if isinstance(x, bytes):
    return x.decode('utf-8', errors='replace')
  if isinstance(x, np.ndarray):
    if x.ndim == 0:
      return to_text(x.item())
    return [to_text(v) for v in x.tolist()]
  if isinstance(x, (list, tuple)):
    return [to_text(v) for v in x]
  if isinstance(x, Mapping):
    return {k: to_text(v) for k, v in x.items()}
  if isinstance(x, np.generic):
    return x.item()
  return x


def rate_num_examples(
    num_examples: float,
    maximum: Optional[float] = None,
    temperature: float = 1.0,
    scale: float = 1.0,
) -> float:
  """T5's examples-proportional mixing rate for a task of `num_examples`.

  rate = min(num_examples * scale, maximum) ** (1 / temperature), the formula
  of `t5.data.utils.rate_num_examples` (Raffel et al. 2020, Sec. 3.5.2).

  Args:
    num_examples: number of training examples of the task.
    maximum: the cap K (None: no cap).
    temperature: temperature-scaled mixing when != 1.
    scale: multiplier applied before the cap.

  Returns:
    The (unnormalised) mixing rate.
  """
  rate = float(num_examples) * scale
  if maximum is not None:
    rate = min(rate, float(maximum))
  if temperature != 1.0:
    rate = rate ** (1.0 / temperature)
  return rate


def register_task(name: str, **kwargs) -> seqio.Task:
  """`seqio.TaskRegistry.add` that replaces an existing task of that name.

  Makes registration idempotent (re-importing or re-running a module's
  `register()` does not raise "already registered").
  """
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def register_mixture(
    name: str,
    tasks: Sequence[Union[TaskOrName, Tuple[TaskOrName, RateSpec]]],
    default_rate: Optional[RateSpec] = None,
    **kwargs,
) -> seqio.Mixture:
  """`seqio.MixtureRegistry.add` that replaces an existing mixture of that name."""
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate, **kwargs)
