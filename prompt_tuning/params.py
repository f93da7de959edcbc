"""Parameter trees as `/`-joined paths: the one flatten helper of the library.

Parameter trees are nested `dict`s named as flaxformer names them. Flattened paths join the keys
with `/` and have no leading slash: `encoder/layers_0/attention/query/kernel`,
`encoder/prompt/prompt/prompt`. Every module that needs paths (the train state, the optimizers,
the checkpoint readers and writers, the backbone's checks) uses these functions.

Path regexes (trainable parameters, optimizer traversals, assignment maps) are matched with
`re.fullmatch` against the path as given and with a leading `/`, so regexes written for flax's
`ModelParamTraversal` (whose paths start with `/`, e.g. the original `.*/prompt/.*`) work
unchanged.
"""

import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

Regexes = Union[str, Sequence[str]]


def flatten_params(
    tree: Mapping[str, Any], is_leaf: Optional[Callable[[Any], bool]] = None
) -> Dict[str, Any]:
  """Nested mappings -> `{'a/b/c': leaf}` in insertion order.

  Only `Mapping`s are descended into; anything else (arrays, None, dataclasses, tuples) is a
  leaf. Empty mappings contribute no entries.

  Args:
    tree: nested mappings.
    is_leaf: optional predicate that stops the descent at a mapping.

  Returns:
    The flat dict.
  """
  out: Dict[str, Any] = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping) and not (is_leaf and is_leaf(node)):
      for key, value in node.items():
        visit(value, f'{prefix}/{key}' if prefix else str(key))
    else:
      out[prefix] = node

  visit(tree, '')
  return out


def unflatten_params(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """`{'a/b/c': leaf}` -> nested dicts (inverse of `flatten_params`)."""
  tree: Dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    keys = path.strip('/').split('/')
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def path_matches(regex: Union[str, 're.Pattern'], path: str) -> bool:
  """Whether `regex` fully matches `path`, with or without a leading `/`."""
  stripped = path.lstrip('/')
  pattern = re.compile(regex) if isinstance(regex, str) else regex
  return bool(pattern.fullmatch(stripped) or pattern.fullmatch('/' + stripped))


def match_any(regexes: Regexes) -> Callable[..., bool]:
  """A path filter that is True when any regex matches (see `path_matches`).

  The returned function takes `(path)` or, like flax's `ModelParamTraversal` filter,
  `(path, value)`, and carries the regexes as its `regexes` attribute.

  Raises:
    ValueError: a regex does not compile (the message names it).
  """
  regexes = (regexes,) if isinstance(regexes, str) else tuple(regexes)
  compiled = []
  for regex in regexes:
    try:
      compiled.append(re.compile(regex))
    except re.error as e:
      raise ValueError(f'Invalid parameter-path regex {regex!r}: {e}') from None

  def filter_fn(path: str, value: Any = None) -> bool:
    del value
    return any(path_matches(r, path) for r in compiled)

  filter_fn.regexes = regexes  # type: ignore[attr-defined]
  return filter_fn


def count_params(tree: Mapping[str, Any]) -> int:
  """Number of scalars in a tree of arrays or shape structs."""
  total = 0
  for leaf in flatten_params(tree).values():
    shape = getattr(leaf, 'shape', ())
    n = 1
    for d in shape:
      n *= int(d)
    total += n
  return total
