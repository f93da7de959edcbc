"""T5X-style optimizer definitions: `OptimizerDef`, `OptaxWrapper`, `MultiOptimizer`.

This mirrors `t5x.optimizers` (the inlined legacy `flax.optim` core) so that gin
configs written for T5X keep working:

- `OptimizerState(step, param_states)` and `OptimizerDef` with
  `init_state(params)`, `apply_gradient(hyper_params, params, state, grads)`,
  `update_hyper_params(**overrides)`, `set_param_axes(axes)` and
  `derive_logical_axes(state, param_logical_axes)`.
- `OptaxWrapper` and the gin-friendly constructors `chain`, `adam`, `adamw`,
  `sgd`, `lion`, `rmsprop`, `adafactor` (optax's), ... built with
  `wrap_optax_optimizer`.
- `MultiOptimizer(traversals_and_optimizers)` with `ModelParamTraversal` and
  `match_any` to train a subset of the parameters (prompt tuning).

Parameter trees are nested dicts. Flattened paths are `/`-joined keys without a
leading slash (`encoder/prompt/prompt/prompt`); traversal filter functions, as
in flax, receive the path *with* a leading slash (`/encoder/prompt/...`).

Besides T5X's behaviour, every optimizer here accepts a **subtree** holding only
the trainable leaves in `init_state`/`apply_gradient` (the runtime
differentiates only the trainable parameters), and `trainable_filter(path)`
tells the runtime which paths those are.

`derive_logical_axes` returns a tree shaped like the optimizer state whose leaves
are `LogicalAxes` (a `tuple` of logical axis names, one per array dimension,
`None` meaning replicated) or `None` where the state itself is `None`.
`LogicalAxes` is a tuple subclass that JAX treats as a pytree *leaf*, so plain
`jax.tree_util.tree_map` visits one leaf per state array.
"""

import functools
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union)

from flax import serialization
from flax import struct
import jax
import jax.numpy as jnp
import optax

from prompt_tuning import params as params_lib

PyTree = Any
FilterFn = Callable[[str, Any], bool]


class LogicalAxes(tuple):
  """A tuple of logical axis names for one array (a pytree leaf for JAX)."""

  __slots__ = ()

  def __repr__(self) -> str:
    return f'LogicalAxes{tuple.__repr__(self)}'


def _replicated(ndim: int) -> LogicalAxes:
  return LogicalAxes((None,) * ndim)


def as_logical_axes(axes: Any) -> Optional[LogicalAxes]:
  """Normalizes one parameter's axis annotation to `LogicalAxes`.

  Accepts a tuple/list of names, a `jax.sharding.PartitionSpec`, or an object
  with a `names` attribute (flax `AxisMetadata` from `param_with_axes`).

  Args:
    axes: the annotation, or None.

  Returns:
    `LogicalAxes`, or None when `axes` is None.
  """
  if axes is None:
    return None
  if hasattr(axes, 'names'):
    axes = axes.names
  return LogicalAxes(tuple(axes))


def _is_axes_leaf(x: Any) -> bool:
  return (
      x is None or isinstance(x, (tuple, list, jax.sharding.PartitionSpec)) or hasattr(x, 'names')
  )


# ----------------------------------------------------------------------------
# Path helpers for nested dicts.
# ----------------------------------------------------------------------------


# The library's one `/`-path helper (`prompt_tuning.params`), under the names this module's callers
# (adafactor, tests, benchmarks) use.
flatten_paths = params_lib.flatten_params
unflatten_paths = params_lib.unflatten_params


_MISSING = object()


def get_path(tree: Any, path: str, default: Any = _MISSING) -> Any:
  """Returns the node at `path` (`a/b/c`) of nested mappings."""
  node = tree
  for k in path.split('/'):
    if not isinstance(node, Mapping) or k not in node:
      if default is _MISSING:
        raise KeyError(path)
      return default
    node = node[k]
  return node


def _copy_dicts(tree: Any) -> Any:
  """Copies the mapping structure (as plain dicts); leaves are shared."""
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _set_path(tree: Dict[str, Any], path: str, value: Any) -> None:
  keys = path.split('/')
  node = tree
  for k in keys[:-1]:
    node = node.setdefault(k, {})
  node[keys[-1]] = value


def _with_slash(path: str) -> str:
  return path if path.startswith('/') else '/' + path


# ----------------------------------------------------------------------------
# Legacy flax.optim-style core.
# ----------------------------------------------------------------------------


@struct.dataclass
class OptimizerState:
  """Optimizer state: the step counter and per-parameter (or optax) states."""

  step: Any
  param_states: Any


class OptimizerDef:
  """Base class of an optimizer definition (T5X / legacy flax.optim).

  Subclasses implement `init_state` and `apply_gradient`. `hyper_params` is a
  `flax.struct` dataclass with (at least) a `learning_rate` field.

  Attributes:
    param_shaped_state: True when `param_states` mirrors the parameter tree
      (one state object per parameter leaf, as Adafactor); False when it is an
      opaque state (optax). `MultiOptimizer` uses this to lay out its state.
  """

  param_shaped_state: bool = True

  def __init__(self, hyper_params: Any):
    self.hyper_params = hyper_params

  def init_state(self, params: PyTree) -> OptimizerState:
    """Returns the initial `OptimizerState` for `params`."""
    raise NotImplementedError()

  def apply_gradient(
      self, hyper_params: Any, params: PyTree, state: OptimizerState, grads: PyTree
  ) -> Tuple[PyTree, OptimizerState]:
    """Applies `grads`; returns `(new_params, new_state)`."""
    raise NotImplementedError()

  def update_hyper_params(self, **hyper_param_overrides: Any) -> Any:
    """Returns the hyper parameters with `hyper_param_overrides` applied.

    Pass `hyper_params=...` to replace them all. `self.hyper_params` is not
    modified.

    Args:
      **hyper_param_overrides: fields to replace, e.g. `learning_rate=lr`.

    Returns:
      The new hyper parameters.
    """
    hp = hyper_param_overrides.pop('hyper_params', self.hyper_params)
    if hyper_param_overrides:
      hp = hp.replace(**hyper_param_overrides)
    return hp

  def set_param_axes(self, param_logical_axes: PyTree) -> None:
    """Receives the parameters' logical axis names (no-op by default)."""
    del param_logical_axes

  def trainable_filter(self, path: str, value: Any = None) -> bool:
    """Whether the parameter at flattened `path` is trained (all are here)."""
    del path, value
    return True

  def derive_logical_axes(
      self, state: OptimizerState, param_logical_axes: PyTree
  ) -> OptimizerState:
    """Logical axes of `state` (generic rule for per-parameter states).

    Each array inside a parameter's state gets the parameter's axes when it
    has the parameter's rank, and replicated axes otherwise; `step` gets `()`.

    Args:
      state: an `OptimizerState` (arrays or `jax.ShapeDtypeStruct`s).
      param_logical_axes: tree of per-parameter logical axes.

    Returns:
      An `OptimizerState` of `LogicalAxes`.
    """
    flat_axes = {
        p: as_logical_axes(a) for p, a in flatten_paths(param_logical_axes, _is_axes_leaf).items()
    }
    param_states = _copy_dicts(state.param_states)
    for path, axes in flat_axes.items():
      st = get_path(state.param_states, path, None)
      if st is None:
        continue

      def leaf_axes(x, axes=axes):
        ndim = len(getattr(x, 'shape', ()))
        if axes is not None and ndim == len(axes):
          return axes
        return _replicated(ndim)

      _set_path(param_states, path, jax.tree_util.tree_map(leaf_axes, st))
    return OptimizerState(step=LogicalAxes(()), param_states=param_states)

  def create(self, target: PyTree) -> 'Optimizer':
    """Creates an `Optimizer` holding `target` and a fresh state."""
    return Optimizer(self, self.init_state(target), target)

  def state_dict(self, target: PyTree, state: OptimizerState) -> Dict[str, Any]:
    """T5X's checkpoint layout: `{'target': ..., 'state': {...}}`."""
    return serialization.to_state_dict(
        {'target': serialization.to_state_dict(target), 'state': serialization.to_state_dict(state)}
    )

  def restore_state(
      self, opt_target: PyTree, opt_state: OptimizerState, state_dict: Mapping[str, Any]
  ) -> Tuple[PyTree, OptimizerState]:
    """Restores target and state from a `state_dict`."""
    opt_target = serialization.from_state_dict(opt_target, state_dict['target'])
    opt_state = serialization.from_state_dict(opt_state, state_dict['state'])
    return opt_target, opt_state


class Optimizer(struct.PyTreeNode):
  """Legacy optimizer object: definition + state + target (T5X)."""

  optimizer_def: OptimizerDef = struct.field(pytree_node=False)
  state: Any = struct.field(pytree_node=True)
  target: Any = struct.field(pytree_node=True)

  def apply_gradient(self, grads: PyTree, **hyper_param_overrides: Any) -> 'Optimizer':
    """Returns a new `Optimizer` after one update with `grads`."""
    hyper_params = self.optimizer_def.update_hyper_params(**hyper_param_overrides)
    new_target, new_state = self.optimizer_def.apply_gradient(
        hyper_params, self.target, self.state, grads
    )
    return self.replace(target=new_target, state=new_state)

  def state_dict(self) -> Dict[str, Any]:
    return self.optimizer_def.state_dict(self.target, self.state)

  def restore_state(self, state: Mapping[str, Any]) -> 'Optimizer':
    target, state = self.optimizer_def.restore_state(self.target, self.state, state)
    return self.replace(target=target, state=state)


# ----------------------------------------------------------------------------
# Optax wrapper.
# ----------------------------------------------------------------------------


@struct.dataclass
class OptaxWrapperHyperParams:
  """Placeholder hyper parameters: optax keeps its schedule internally."""

  learning_rate: Optional[float] = None


_OptaxWrapperHyperParams = OptaxWrapperHyperParams


def _is_optax_named_state(x: Any) -> bool:
  return isinstance(x, tuple) and hasattr(x, '_fields')


def derive_optax_logical_axes(optax_state: Any, param_logical_axes: PyTree) -> Any:
  """Maps an optax state to logical axes.

  Mappings inside the state whose key paths are parameter paths (e.g.
  `ScaleByAdamState.mu`/`nu`, `TraceState.trace`, masked/multi-transform inner
  states) get the parameters' axes when the ranks agree; every other array
  (counts, factored statistics, ...) is replicated; `optax.MaskedNode`s are
  kept. optax's `FactoredState` is replicated as a whole.

  Args:
    optax_state: the optax state (arrays or `jax.ShapeDtypeStruct`s).
    param_logical_axes: tree of per-parameter logical axes.

  Returns:
    The same structure with `LogicalAxes` leaves.
  """
  flat_axes = {
      p: as_logical_axes(a) for p, a in flatten_paths(param_logical_axes, _is_axes_leaf).items()
  }
  factored_state = getattr(getattr(optax, 'transforms', None), 'FactoredState', None) or getattr(
      optax, 'FactoredState', None
  )

  def replicate_all(node: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: _replicated(len(getattr(x, 'shape', ()))), node)

  def rec(node: Any, path: Tuple[str, ...]) -> Any:
    if node is None or isinstance(node, optax.MaskedNode):
      return node
    if factored_state is not None and isinstance(node, factored_state):
      return replicate_all(node)
    if isinstance(node, Mapping):
      return {k: rec(v, path + (str(k),)) for k, v in node.items()}
    if _is_optax_named_state(node):
      return type(node)(*[rec(c, ()) for c in node])
    if isinstance(node, (tuple, list)):
      return type(node)(rec(c, ()) for c in node)
    if hasattr(node, 'shape'):
      ndim = len(node.shape)
      axes = flat_axes.get('/'.join(path)) if path else None
      if axes is not None and len(axes) == ndim:
        return axes
      return _replicated(ndim)
    if isinstance(node, (int, float, complex, bool)):
      return LogicalAxes(())
    return replicate_all(node)

  return rec(optax_state, ())


class OptaxWrapper(OptimizerDef):
  """Wraps an `optax.GradientTransformation` as a T5X `OptimizerDef`.

  Its `hyper_params.learning_rate` is a placeholder that is ignored: put the
  learning rate (or an optax schedule) into the optax transformation itself.
  """

  param_shaped_state = False

  def __init__(self, optax_optimizer: optax.GradientTransformation):
    self.optax_optimizer = optax_optimizer
    super().__init__(hyper_params=OptaxWrapperHyperParams())

  def init_state(self, params: PyTree) -> OptimizerState:
    """`OptimizerState(step=0, param_states=tx.init(params))`."""
    return OptimizerState(
        step=jnp.asarray(0, dtype=jnp.int32), param_states=self.optax_optimizer.init(params)
    )

  def apply_gradient(
      self, hyper_params: Any, params: PyTree, state: OptimizerState, grads: PyTree
  ) -> Tuple[PyTree, OptimizerState]:
    """`tx.update` followed by `optax.apply_updates`."""
    del hyper_params
    updates, new_optax_state = self.optax_optimizer.update(grads, state.param_states, params)
    new_params = optax.apply_updates(params, updates)
    return new_params, OptimizerState(step=state.step + 1, param_states=new_optax_state)

  def derive_logical_axes(
      self, state: OptimizerState, param_logical_axes: PyTree
  ) -> OptimizerState:
    """See `derive_optax_logical_axes`; `step` gets `()`."""
    return OptimizerState(
        step=LogicalAxes(()),
        param_states=derive_optax_logical_axes(state.param_states, param_logical_axes),
    )


def wrap_optax_optimizer(
    optax_optimizer: Callable[..., optax.GradientTransformation],
) -> Callable[..., OptaxWrapper]:
  """Turns an optax constructor into one returning an `OptaxWrapper`.

  Args:
    optax_optimizer: a function returning an `optax.GradientTransformation`.

  Returns:
    A function with the same arguments returning `OptaxWrapper(...)`.
  """

  @functools.wraps(optax_optimizer)
  def wrapped_optimizer(*args, **kwargs) -> OptimizerDef:
    return OptaxWrapper(optax_optimizer(*args, **kwargs))

  return wrapped_optimizer


def _chain(transformations: Sequence[optax.GradientTransformation]) -> optax.GradientTransformation:
  """`optax.chain(*transformations)` taking one sequence (gin-friendly)."""
  return optax.chain(*transformations)


_chain.__name__ = 'chain'
_chain.__qualname__ = 'chain'

chain = wrap_optax_optimizer(_chain)
adabelief = wrap_optax_optimizer(optax.adabelief)
adafactor = wrap_optax_optimizer(optax.adafactor)
adagrad = wrap_optax_optimizer(optax.adagrad)
adam = wrap_optax_optimizer(optax.adam)
adamw = wrap_optax_optimizer(optax.adamw)
fromage = wrap_optax_optimizer(optax.fromage)
lamb = wrap_optax_optimizer(optax.lamb)
lars = wrap_optax_optimizer(optax.lars)
lion = wrap_optax_optimizer(optax.lion)
noisy_sgd = wrap_optax_optimizer(optax.noisy_sgd)
radam = wrap_optax_optimizer(optax.radam)
rmsprop = wrap_optax_optimizer(optax.rmsprop)
sgd = wrap_optax_optimizer(optax.sgd)
yogi = wrap_optax_optimizer(optax.yogi)

# ----------------------------------------------------------------------------
# Traversals and the MultiOptimizer.
# ----------------------------------------------------------------------------


class ModelParamTraversal:
  """Selects parameters by name, duck-compatible with flax's traversal.

  `filter_fn(path, value)` receives the flattened path with a leading slash
  (`/encoder/prompt/prompt/prompt`) and the leaf, exactly as flax's
  `traverse_util.ModelParamTraversal` calls it.
  """

  def __init__(self, filter_fn: FilterFn):
    if not callable(filter_fn):
      raise TypeError(f'ModelParamTraversal.filter_fn must be callable, got {filter_fn!r}')
    self.filter_fn = filter_fn

  @property
  def _filter_fn(self) -> FilterFn:  # flax's attribute name
    return self.filter_fn

  def _selected(self, inputs: PyTree) -> Iterator[Tuple[str, Any]]:
    for path, value in flatten_paths(inputs).items():
      if self.filter_fn('/' + path, value):
        yield path, value

  def iterate(self, inputs: PyTree) -> Iterator[Any]:
    """Yields the selected leaves of nested dict `inputs`."""
    for _, value in self._selected(inputs):
      yield value

  def update(self, fn: Callable[[Any], Any], inputs: PyTree) -> PyTree:
    """Returns `inputs` with `fn` applied to the selected leaves."""
    flat = flatten_paths(inputs)
    return unflatten_paths(
        {p: (fn(v) if self.filter_fn('/' + p, v) else v) for p, v in flat.items()}
    )

  def __repr__(self) -> str:
    return f'ModelParamTraversal({self.filter_fn!r})'


def match_any(regexes: Union[str, Sequence[str]]) -> FilterFn:
  """Returns `filter_fn(path, value)`: whether any regex fully matches `path`.

  The gin-configurable name (`optimizers.match_any.regexes = %PROMPT_REGEX`) of
  `prompt_tuning.params.match_any`: as in prompt tuning's `utils.match_any`,
  `re.fullmatch` is used, and paths are tried with and without the leading
  slash, so `'.*/prompt/.*'` selects `encoder/prompt/prompt/prompt` and
  `/encoder/prompt/prompt/prompt` alike.

  Args:
    regexes: a regex or a sequence of regexes.

  Returns:
    The filter function.

  Raises:
    ValueError: a regex does not compile.
  """
  return params_lib.match_any(regexes)


def _filter_fn_of(traversal: Any) -> FilterFn:
  """Extracts the `filter_fn(path, value)` of a traversal-like object."""
  if isinstance(traversal, ModelParamTraversal):
    return traversal.filter_fn
  fn = getattr(traversal, '_filter_fn', None) or getattr(traversal, 'filter_fn', None)
  if fn is not None and callable(fn):
    return fn
  if callable(traversal) and not hasattr(traversal, 'iterate'):
    return traversal
  raise TypeError(
      f'Unsupported traversal {traversal!r}: expected a ModelParamTraversal '
      '(prompt_tuning.runtime.optimizers or flax.traverse_util) or a '
      'filter_fn(path, value).'
  )


class MultiOptimizer(OptimizerDef):
  """Applies sub-optimizers to the parameter subsets their traversals select.

  As in T5X: a single sequence argument of `(traversal, optimizer_def)` pairs;
  overlapping traversals raise; leaves matched by no traversal get state None
  and are never updated; `hyper_params` is a list (one per sub-optimizer).

  When every sub-optimizer has per-parameter state (`param_shaped_state`, e.g.
  Adafactor), `param_states` mirrors the parameter tree with None for
  untrained leaves (T5X's checkpoint layout). Otherwise (optax sub-optimizers)
  `param_states` is a tuple holding each sub-optimizer's own state.

  `params`, `grads` and `state.param_states` may be the full tree or a subtree
  holding only the trainable leaves; both give the same updates.
  """

  def __init__(self, traversals_and_optimizers: Sequence[Tuple[Any, OptimizerDef]]):
    pairs = list(traversals_and_optimizers)
    if not pairs:
      raise ValueError('MultiOptimizer needs at least one ' '(traversal, optimizer) pair.')
    for pair in pairs:
      if len(pair) != 2:
        raise ValueError(
            'MultiOptimizer.traversals_and_optimizers must hold (traversal, '
            f'optimizer) pairs; got {pair!r}.'
        )
    self.traversals = tuple(t for t, _ in pairs)
    self.sub_optimizers = tuple(o for _, o in pairs)
    self._filters = tuple(_filter_fn_of(t) for t in self.traversals)
    self.param_shaped_state = all(
        getattr(o, 'param_shaped_state', True) for o in self.sub_optimizers
    )

  @property
  def hyper_params(self) -> List[Any]:
    """One hyper-parameter struct per sub-optimizer (always current)."""
    return [o.hyper_params for o in self.sub_optimizers]

  @hyper_params.setter
  def hyper_params(self, value: Sequence[Any]) -> None:
    value = list(value)
    if len(value) != len(self.sub_optimizers):
      raise ValueError(f'Expected {len(self.sub_optimizers)} hyper params, ' f'got {len(value)}.')
    for opt, hp in zip(self.sub_optimizers, value):
      opt.hyper_params = hp

  # -- matching ---------------------------------------------------------------

  def _match(self, path: str, value: Any) -> Optional[int]:
    """Index of the sub-optimizer training `path`, or None; raises on overlap."""
    hits = [i for i, f in enumerate(self._filters) if f('/' + path, value)]
    if len(hits) > 1:
      raise ValueError(
          f'Multiple optimizers match the same leaf {path!r}: traversals '
          f'{hits}. Make the MultiOptimizer traversals disjoint.'
      )
    return hits[0] if hits else None

  def _partition(self, flat: Mapping[str, Any]) -> List[List[str]]:
    groups: List[List[str]] = [[] for _ in self.sub_optimizers]
    for path, value in flat.items():
      idx = self._match(path, value)
      if idx is not None:
        groups[idx].append(path)
    return groups

  def trainable_filter(self, path: str, value: Any = None) -> bool:
    """True when some traversal selects `path` (with or without '/')."""
    path = _with_slash(path)
    return any(f(path, value) for f in self._filters)

  # -- state ------------------------------------------------------------------

  def init_state(self, params: PyTree) -> OptimizerState:
    """Sub-optimizer states for matched leaves; None for the others."""
    flat = flatten_paths(params)
    groups = self._partition(flat)
    sub_states = []
    for opt, paths in zip(self.sub_optimizers, groups):
      sub_params = unflatten_paths({p: flat[p] for p in paths})
      sub_states.append(opt.init_state(sub_params).param_states)
    if self.param_shaped_state:
      param_states = unflatten_paths({p: None for p in flat})
      for paths, ss in zip(groups, sub_states):
        for p in paths:
          _set_path(param_states, p, get_path(ss, p))
    else:
      param_states = tuple(sub_states)
    return OptimizerState(jnp.asarray(0, dtype=jnp.int32), param_states)

  def apply_gradient(
      self, hyper_params: Sequence[Any], params: PyTree, state: OptimizerState, grads: PyTree
  ) -> Tuple[PyTree, OptimizerState]:
    """Updates each matched subset with its sub-optimizer."""
    hyper_params = list(hyper_params)
    flat_params = flatten_paths(params)
    flat_grads = flatten_paths(grads)
    groups = self._partition(flat_params)
    new_flat_params = dict(flat_params)
    if self.param_shaped_state:
      new_param_states = _copy_dicts(state.param_states)
    else:
      new_param_states = list(state.param_states)

    for i, (opt, hp, paths) in enumerate(zip(self.sub_optimizers, hyper_params, groups)):
      if not paths:
        continue
      missing = [p for p in paths if p not in flat_grads]
      if missing:
        raise ValueError(f'No gradient for trained parameters {missing}.')
      sub_params = unflatten_paths({p: flat_params[p] for p in paths})
      sub_grads = unflatten_paths({p: flat_grads[p] for p in paths})
      if self.param_shaped_state:
        sub_ss = {}
        for p in paths:
          st = get_path(state.param_states, p, _MISSING)
          if st is _MISSING or st is None:
            raise ValueError(
                f'No optimizer state for trained parameter {p!r}; was the '
                'state initialized for a different parameter tree?'
            )
          sub_ss[p] = st
        sub_state = OptimizerState(state.step, unflatten_paths(sub_ss))
      else:
        sub_state = OptimizerState(state.step, state.param_states[i])
      new_sub_params, new_sub_state = opt.apply_gradient(hp, sub_params, sub_state, sub_grads)
      for p in paths:
        new_flat_params[p] = get_path(new_sub_params, p)
      if self.param_shaped_state:
        for p in paths:
          _set_path(new_param_states, p, get_path(new_sub_state.param_states, p))
      else:
        new_param_states[i] = new_sub_state.param_states

    if not self.param_shaped_state:
      new_param_states = tuple(new_param_states)
    return (unflatten_paths(new_flat_params), OptimizerState(state.step + 1, new_param_states))

  def update_hyper_params(self, **hyper_param_overrides: Any) -> List[Any]:
    """Applies the overrides (e.g. `learning_rate`) to every sub-optimizer."""
    hps = hyper_param_overrides.pop('hyper_params', self.hyper_params)
    if hyper_param_overrides:
      hps = [hp.replace(**hyper_param_overrides) for hp in hps]
    return list(hps)

  # -- axes -------------------------------------------------------------------

  def _axes_groups(self, param_logical_axes: PyTree) -> Tuple[Dict[str, Any], List[List[str]]]:
    flat_axes = flatten_paths(param_logical_axes, _is_axes_leaf)
    groups: List[List[str]] = [[] for _ in self.sub_optimizers]
    for path, axes in flat_axes.items():
      idx = self._match(path, axes)
      if idx is not None:
        groups[idx].append(path)
    return flat_axes, groups

  def set_param_axes(self, param_logical_axes: PyTree) -> None:
    """Passes each sub-optimizer the axes of the leaves it trains."""
    flat_axes, groups = self._axes_groups(param_logical_axes)
    for opt, paths in zip(self.sub_optimizers, groups):
      if hasattr(opt, 'set_param_axes'):
        opt.set_param_axes(unflatten_paths({p: flat_axes[p] for p in paths}))

  def derive_logical_axes(
      self, state: OptimizerState, param_logical_axes: PyTree
  ) -> OptimizerState:
    """Sub-optimizers' axes for their leaves; None for untrained leaves."""
    flat_axes, groups = self._axes_groups(param_logical_axes)
    if self.param_shaped_state:
      new_param_states = _copy_dicts(state.param_states)
      # Untrained leaves (None state) keep None.
      for i, (opt, paths) in enumerate(zip(self.sub_optimizers, groups)):
        present = [p for p in paths if get_path(state.param_states, p, None) is not None]
        if not present:
          continue
        sub_axes = unflatten_paths({p: flat_axes[p] for p in present})
        sub_ss = unflatten_paths({p: get_path(state.param_states, p) for p in present})
        derived = opt.derive_logical_axes(OptimizerState(None, sub_ss), sub_axes)
        for p in present:
          _set_path(new_param_states, p, get_path(derived.param_states, p))
    else:
      derived_list = []
      for i, (opt, paths) in enumerate(zip(self.sub_optimizers, groups)):
        sub_axes = unflatten_paths({p: flat_axes[p] for p in paths})
        derived = opt.derive_logical_axes(OptimizerState(None, state.param_states[i]), sub_axes)
        derived_list.append(derived.param_states)
      new_param_states = tuple(derived_list)
    return OptimizerState(step=LogicalAxes(()), param_states=new_param_states)


def traversal_from_flax(traversal: Any) -> ModelParamTraversal:
  """Converts a flax `traverse_util.ModelParamTraversal` to ours."""
  if isinstance(traversal, ModelParamTraversal):
    return traversal
  return ModelParamTraversal(_filter_fn_of(traversal))


__all__ = [
    'LogicalAxes',
    'as_logical_axes',
    'flatten_paths',
    'unflatten_paths',
    'get_path',
    'OptimizerState',
    'OptimizerDef',
    'Optimizer',
    'OptaxWrapperHyperParams',
    'OptaxWrapper',
    'derive_optax_logical_axes',
    'wrap_optax_optimizer',
    'chain',
    'adabelief',
    'adafactor',
    'adagrad',
    'adam',
    'adamw',
    'fromage',
    'lamb',
    'lars',
    'lion',
    'noisy_sgd',
    'radam',
    'rmsprop',
    'sgd',
    'yogi',
    'ModelParamTraversal',
    'match_any',
    'MultiOptimizer',
    'traversal_from_flax',
]
