"""Split parameters into trainable and frozen trees; gradients of the first only.

Parameter paths are the `/`-joined keys of the nested parameter dict, without a
leading slash (`encoder/prompt/prompt/prompt`). A regex matches a path when
`re.fullmatch(regex, path)` or `re.fullmatch(regex, '/' + path)` succeeds, so
regexes written for flax's `ModelParamTraversal` (whose paths start with `/`,
e.g. the original `.*/prompt/.*`) work unchanged.

Prompt tuning trains `('.*/prompt/.*',)`; model tuning is the same code with
`('.*',)`.

`value_and_grad_trainable(loss_fn)` differentiates only with respect to the
trainable tree: the frozen tree enters through `jax.lax.stop_gradient` and is
not an argument JAX differentiates, so no backbone weight gradients are ever
built (the prompt-only step costs about 2x a forward pass, not 3x).
"""

import re
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence, Tuple, Union

import jax

PyTree = Any
Regexes = Union[str, Sequence[str]]

DEFAULT_TRAINABLE_REGEXES = ('.*/prompt/.*',)


def _as_regexes(regexes: Regexes) -> Tuple[str, ...]:
  if isinstance(regexes, str):
    return (regexes,)
  return tuple(regexes)


def flatten_params(params: Mapping[str, Any], sep: str = '/') -> Dict[str, Any]:
  """Nested dict -> `{'a/b/c': leaf}` (no leading separator)."""
  flat = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(value, f'{prefix}{sep}{key}' if prefix else str(key))
    else:
      flat[prefix] = node

  visit(params, '')
  return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = '/') -> Dict[str, Any]:
  """`{'a/b/c': leaf}` -> nested dict (inverse of `flatten_params`)."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    keys = path.strip(sep).split(sep)
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def path_matches(regex: str, path: str) -> bool:
  """Whether `regex` fully matches `path` or `'/' + path`."""
  path = path.lstrip('/')
  return bool(re.fullmatch(regex, path) or re.fullmatch(regex, '/' + path))


def match_any(regexes: Regexes) -> Callable[..., bool]:
  """A path filter: True when any regex matches (see `path_matches`).

  The returned function takes `(path)` or, like flax's `ModelParamTraversal`
  filter, `(path, value)`.

  Args:
    regexes: one regex or a sequence of them.

  Returns:
    `fn(path, value=None) -> bool`.
  """
  compiled = _as_regexes(regexes)

  def filter_fn(path: str, value: Any = None) -> bool:
    del value
    return any(path_matches(r, path) for r in compiled)

  return filter_fn


def partition_params(
    params: Mapping[str, Any],
    trainable_regexes: Regexes = DEFAULT_TRAINABLE_REGEXES,
    *,
    allow_unmatched: bool = False,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Splits `params` into `(trainable, frozen)` nested dicts.

  Each output holds only its own leaves (a sub-dict with no leaves is absent).

  Args:
    params: nested parameter dict (`{'params': ...}` is unwrapped by caller).
    trainable_regexes: a path is trainable when any regex matches it.
    allow_unmatched: do not raise when a regex matches no parameter.

  Returns:
    `(trainable, frozen)`.

  Raises:
    ValueError: a regex matches no parameter (the message lists some paths).
  """
  regexes = _as_regexes(trainable_regexes)
  flat = flatten_params(params)
  if not allow_unmatched:
    for regex in regexes:
      try:
        re.compile(regex)
      except re.error as e:
        raise ValueError(f'Invalid trainable regex {regex!r}: {e}') from e
      if not any(path_matches(regex, p) for p in flat):
        sample = list(flat)[:8]
        raise ValueError(
            f'Trainable regex {regex!r} matches no parameter. Parameter paths '
            f'look like {sample} ({len(flat)} in all). Fix the regex (they are '
            'matched with re.fullmatch against the /-joined path).'
        )
  is_trainable = match_any(regexes)
  trainable = {p: v for p, v in flat.items() if is_trainable(p)}
  frozen = {p: v for p, v in flat.items() if not is_trainable(p)}
  return unflatten_params(trainable), unflatten_params(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> Dict[str, Any]:
  """Inverse of `partition_params`: one nested dict with every leaf.

  Raises:
    ValueError: a path is present in both trees.
  """
  flat_t = flatten_params(trainable)
  flat_f = flatten_params(frozen)
  both = set(flat_t) & set(flat_f)
  if both:
    raise ValueError(f'Parameters both trainable and frozen: {sorted(both)}')
  return unflatten_params({**flat_f, **flat_t})


def trainable_paths(
    params: Mapping[str, Any], trainable_regexes: Regexes = DEFAULT_TRAINABLE_REGEXES
) -> Iterable[str]:
  """The flattened paths `partition_params` would put in the trainable tree."""
  is_trainable = match_any(trainable_regexes)
  return [p for p in flatten_params(params) if is_trainable(p)]


def value_and_grad_trainable(
    loss_fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., Any]:
  """`value_and_grad` of `loss_fn(params, *args)` w.r.t. the trainable part.

  Args:
    loss_fn: `loss_fn(params, *args, **kwargs) -> loss` (or `(loss, aux)` with
      `has_aux`), taking the full nested parameter dict.
    has_aux: as in `jax.value_and_grad`.

  Returns:
    `fn(trainable, frozen, *args, **kwargs) -> (value, grads)` where `grads`
    has the structure of `trainable`. `frozen` is wrapped in
    `jax.lax.stop_gradient` and never differentiated.
  """

  def fn(trainable: PyTree, frozen: PyTree, *args: Any, **kwargs: Any):

    def loss_of_trainable(t: PyTree):
      params = merge_params(t, jax.lax.stop_gradient(frozen))
      return loss_fn(params, *args, **kwargs)

    return jax.value_and_grad(loss_of_trainable, has_aux=has_aux)(trainable)

  return fn
