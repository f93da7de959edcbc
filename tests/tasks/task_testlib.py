"""Helpers shared by the GLUE / SuperGLUE / transfer / QA task tests (mock TFDS data)."""

import functools

import seqio

from prompt_tuning.data import preprocessors as prep
from prompt_tuning.data import utils


@functools.lru_cache(maxsize=None)
def examples(name: str, split: str, n: int = 2):
  """The first `n` preprocessed examples of a task, texts decoded, `inputs` as token lists."""
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(None, split=split, shuffle=False, try_in_mem_cache=False)
  return tuple(
      {k: utils.to_text(v) if k != 'inputs' else v.tolist() for k, v in ex.items()}
      for ex in ds.take(n).as_numpy_iterator()
  )


@functools.lru_cache(maxsize=None)
def raw_examples(name: str, split: str, n: int = 2):
  """The first `n` examples of a task's source, before preprocessing."""
  ds = seqio.get_mixture_or_task(name).source.get_dataset(split=split, shuffle=False)
  return tuple(
      {k: utils.to_text(v) for k, v in ex.items()} for ex in ds.take(n).as_numpy_iterator()
  )


def describe(fn):
  """A comparable description of a (partial) preprocessor chain."""
  if isinstance(fn, functools.partial):
    return (
        'partial',
        describe(fn.func),
        tuple(describe(a) for a in fn.args),
        tuple(sorted((k, describe(v)) for k, v in fn.keywords.items())),
    )
  if isinstance(fn, seqio.CacheDatasetPlaceholder):
    return 'cache'
  if isinstance(fn, (list, tuple)):
    return tuple(describe(x) for x in fn)
  if isinstance(fn, dict):
    return tuple(sorted((k, describe(v)) for k, v in fn.items()))
  if callable(fn):
    return (getattr(fn, '__module__', None), getattr(fn, '__qualname__', repr(fn)))
  return fn


def expected_chain(text_preprocessors, prefix: str, index: int):
  """The preprocessor chain of a task variant (`''`, `taskless_` or `task_index_` prefix)."""
  chain = list(text_preprocessors)
  if prefix:
    chain.append(prep.remove_first_text_token)
  chain.append(seqio.preprocessors.tokenize)
  if prefix == 'task_index_':
    chain.append(functools.partial(prep.add_sentinel_to_beginning, field='inputs', offset=index))
  chain += [seqio.CacheDatasetPlaceholder(), seqio.preprocessors.append_eos_after_trim]
  return describe(chain)
