"""Soft prompts: the prompt parameter, its initializers and combine functions.

This module holds the three building blocks of prompt tuning (Lester et al.
2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"):

* `Prompt`: a Flax module owning one `[P, H]` float32 parameter named `prompt`
  with logical axes `('prompt', 'prompt_embed')` (always replicated, so it can
  be saved as a `.npy`).
* Initializers. Every initializer factory is a plain function returning
  `init(rng, shape, dtype=jnp.float32) -> array`, so gin configures them by
  binding the factory's arguments (`prompt_init = @prompts.uniform()`):

  - `uniform(scale=0.5)`: U[-scale, scale), the paper's random init.
  - `uniform_t5x(scale=0.5)`: U[0, scale), what the official T5X gin files
    actually bind (`flax.linen.initializers.uniform`).
  - `from_sample_of_embeddings(embeddings, population_size=5000)`:
    "sampled vocab" init.
  - `from_embedded_list(embeddings, vocab, texts, initializer)`: "class label"
    init.
  - `from_embedded_string(embeddings, vocab, text, initializer)`.
  - `from_array(prompt)` with the loaders `np_load(path)` and
    `t5x_load(checkpoint_path, variable_path)`.

  `embeddings`/`prompt` arguments may be arrays or zero-argument callables that
  return an array (for example the lazy loader returned by `t5x_load`), so that
  nothing is read from disk until the parameter is actually initialized.
* Combine functions `combine(prompt [B, P, H], embedded [B, L, H],
  tokens [B, L]) -> [B, P + L, H]` that place the prompt in the embedded input
  (`prefix_prompt`, `prefix_prompt_after_bos`, `suffix_prompt`) and their mask
  counterparts (`prefix_prompt_mask`, ...). `combine_mask` computes the mask
  layout of *any* combine function by running it on the mask itself.
"""

import logging
import re
import threading
import weakref
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
from flax.linen import partitioning
import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # jax.Array | np.ndarray
DType = Any
Shape = Sequence[int]
Initializer = Callable[..., Array]  # init(rng, shape, dtype=jnp.float32)
ArrayOrLoader = Union[Array, Callable[[], Array]]
CombineFn = Callable[[Array, Array, Array], Array]

PROMPT_AXES = ('prompt', 'prompt_embed')
DEFAULT_POPULATION_SIZE = 5000
EOS_ID = 1

logger = logging.getLogger(__name__)


# ============================================================================
# Small helpers
# ============================================================================


def _resolve(value: ArrayOrLoader) -> Array:
  """Returns `value`, calling it first when it is a zero-argument loader."""
  if callable(value) and not hasattr(value, 'shape'):
    value = value()
  if value is None:
    raise ValueError('Expected an array (or a loader returning one), got None.')
  if not hasattr(value, 'shape'):
    value = np.asarray(value)
  return value


def _is_concrete(x: Array) -> bool:
  """Whether `x` holds a concrete value (not a tracer inside jit/init)."""
  return not isinstance(x, jax.core.Tracer)


def _check_feature_dim(table: Array, shape: Shape, what: str) -> None:
  if len(shape) != 2:
    raise ValueError(
        f'{what} initializes a [length, embed_dim] prompt, but was asked for '
        f'shape {tuple(shape)}.'
    )
  if table.ndim != 2:
    raise ValueError(
        f'{what} needs a [vocab, embed_dim] embedding table, got shape ' f'{tuple(table.shape)}.'
    )
  if table.shape[-1] != shape[-1]:
    raise ValueError(
        f'{what}: the embedding table has {table.shape[-1]} features '
        f'(shape {tuple(table.shape)}) but the prompt has {shape[-1]} '
        f'(shape {tuple(shape)}). Use the embedding table of the model the '
        'prompt is trained for.'
    )


def expand_to_batch(x: Array, batch_size: int) -> Array:
  """Broadcasts an unbatched `[P, H]` array to `[batch_size, P, H]`."""
  return jnp.broadcast_to(x[None], (batch_size,) + tuple(x.shape))


# ============================================================================
# Loaders
# ============================================================================


def _open(path: str, mode: str = 'rb'):
  """Opens a local path or a URL (`gs://...`) through `prompt_tuning.fs`."""
  from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

  return fs.open(path, mode)


def np_load(
    path: str,
    restore_dtype: Optional[DType] = None,
    library_dir: Optional[str] = None,
    backbone: Any = None,
) -> np.ndarray:
  """Loads a `.npy` file (local or `gs://...` through `tf.io.gfile`), or a library entry.

  Args:
    path: the file (the original repo's numpy checkpoints have no `.npy`
      suffix; any name works), or `library:NAME`, an entry of the prompt
      library (`prompt_tuning.library`).
    restore_dtype: optional dtype to cast the array to.
    library_dir: the library of `library:NAME` paths (`LIBRARY_DIR`; default
      `$PROMPT_TUNING_LIBRARY`). Unused for files.
    backbone: for `library:NAME`, the frozen checkpoint the prompt is used
      with: the entry must have been trained on it. Unused for files.

  Returns:
    The array.

  Raises:
    FileNotFoundError: with the path, when the file does not exist.
  """
  if isinstance(path, str) and path.startswith('library:'):
    from prompt_tuning import library  # pylint: disable=g-import-not-at-top

    arr = library.load_prompt(path, library_dir=library_dir, backbone=backbone)
    return arr.astype(restore_dtype) if restore_dtype is not None else arr
  try:
    with _open(path, 'rb') as f:
      arr = np.load(f, allow_pickle=False)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'Prompt/embedding file {path!r} does not exist (np_load).') from e
  if restore_dtype is not None:
    arr = arr.astype(restore_dtype)
  return arr


_VARIABLE_CACHE: 'weakref.WeakValueDictionary[Tuple[str, str, str], np.ndarray]'
_VARIABLE_CACHE = weakref.WeakValueDictionary()
_CACHE_LOCK = threading.Lock()


def _read_variable(checkpoint_path: str, variable_path: str) -> np.ndarray:
  """Reads one variable from a checkpoint of any format (T5X, Hugging Face, this project's orbax).

  One call to `prompt_tuning.checkpoints.formats.load_params`, which detects the format once and
  reads only the requested array (for T5X and orbax checkpoints).

  Raises:
    KeyError: the checkpoint has no such variable (the message lists close matches).
  """
  # The checkpoint readers are imported when a variable is first read: building a prompt module
  # (and importing this file) needs none of them.
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

  loaded = formats.load_params(checkpoint_path, variables=[variable_path])
  flat = params_lib.flatten_params(loaded)
  if variable_path not in flat:
    raise KeyError(
        f'Variable {variable_path!r} not found in checkpoint {checkpoint_path!r}; the selection '
        f'gave {sorted(flat)[:10]}. Pass the full "/"-joined path of one array.'
    )
  return np.asarray(flat[variable_path])


class LazyVariable:
  """A zero-argument callable that reads one checkpoint variable on first use.

  The result is cached on the instance and shared (weakly) between instances
  reading the same `(checkpoint_path, variable_path, dtype)`, so a gin file that
  binds `@t5x_load()` for both the class-label and the sampled-vocab
  initializers reads the embedding table once.
  """

  def __init__(
      self, checkpoint_path: str, variable_path: str, restore_dtype: Optional[DType] = None
  ):
    self.checkpoint_path = checkpoint_path
    self.variable_path = re.sub(r'^/?(target/)?', '', variable_path)
    self.restore_dtype = restore_dtype
    self._value = None

  @property
  def _key(self) -> Tuple[str, str, str]:
    return (
        str(self.checkpoint_path),
        self.variable_path,
        str(np.dtype(self.restore_dtype)) if self.restore_dtype else '',
    )

  def __call__(self) -> np.ndarray:
    if self._value is None:
      with _CACHE_LOCK:
        value = _VARIABLE_CACHE.get(self._key)
        if value is None:
          value = _read_variable(self.checkpoint_path, self.variable_path)
          if self.restore_dtype is not None:
            value = value.astype(self.restore_dtype)
          _VARIABLE_CACHE[self._key] = value
        self._value = value
    return self._value

  def __array__(self, dtype=None, copy=None):  # pylint: disable=redefined-builtin
    del copy
    value = self()
    return value if dtype is None else value.astype(dtype)

  def __repr__(self) -> str:
    state = 'loaded' if self._value is not None else 'not loaded'
    return f'LazyVariable({self.checkpoint_path!r}, {self.variable_path!r}, ' f'{state})'


def t5x_load(
    checkpoint_path: str,
    variable_path: str = 'token_embedder/embedding',
    restore_dtype: Optional[DType] = None,
) -> LazyVariable:
  """Lazily reads one variable (default: the embedding table) of a checkpoint.

  Works for T5X checkpoints (`checkpoint` msgpack + zarr), Hugging Face T5
  directories and this project's orbax checkpoints (`MODEL_DIR/checkpoint_<step>`,
  or `MODEL_DIR` for its latest), all through one call to
  `prompt_tuning.checkpoints.formats.load_params`. Nothing is read until the
  returned loader is called (initializers call it when the parameter is
  created), and only the requested variable is read.

  Args:
    checkpoint_path: checkpoint directory (local or `gs://`).
    variable_path: `/`-joined flaxformer path; a leading `target/` is optional.
    restore_dtype: optional dtype to cast to.

  Returns:
    A `LazyVariable`: call it (or `np.asarray` it) to get the array.
  """
  return LazyVariable(checkpoint_path, variable_path, restore_dtype)


def clear_cache() -> None:
  """Forgets variables shared between `t5x_load` loaders."""
  with _CACHE_LOCK:
    _VARIABLE_CACHE.clear()


# ============================================================================
# Initializers
# ============================================================================


def uniform(scale: float = 0.5) -> Initializer:
  """Random init U[-scale, scale) (Lester et al. 2021: U[-0.5, 0.5]).

  Args:
    scale: half-width of the interval centred on zero.

  Returns:
    `init(rng, shape, dtype=float32)`.
  """

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    return jax.random.uniform(rng, tuple(shape), dtype, -scale, scale)

  return init


def uniform_t5x(scale: float = 0.5) -> Initializer:
  """Random init U[0, scale): what the official T5X prompt-tuning gin binds.

  `configs/models/t5_1_1_prompt.gin` of google-research/prompt-tuning uses
  `flax.linen.initializers.uniform(scale=0.5)`, which is *not* centred. Use this
  to reproduce released runs exactly; `uniform` is the paper's description.

  Args:
    scale: the upper bound.

  Returns:
    `init(rng, shape, dtype=float32)`.
  """

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    return jax.random.uniform(rng, tuple(shape), dtype, 0.0, scale)

  return init


def zeros() -> Initializer:
  """All-zero init (used as the fallback of string initialization)."""

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    del rng
    return jnp.zeros(tuple(shape), dtype)

  return init


def _gather_rows(table: Array, index: Array) -> Array:
  """`table[index]`; in numpy when the index is concrete (no device copy)."""
  if _is_concrete(index):
    return jnp.asarray(np.asarray(table)[np.asarray(index)])
  return jnp.take(jnp.asarray(table), index, axis=0)


def from_sample_of_embeddings(
    embeddings: ArrayOrLoader, population_size: Optional[int] = DEFAULT_POPULATION_SIZE
) -> Initializer:
  """ "Sampled vocab" init: each position is a row of the embedding table.

  Rows are drawn uniformly *without* replacement from the first
  `population_size` rows (SentencePiece orders pieces by frequency, so these
  are the most common tokens; the paper uses 5000). Only when the prompt is
  longer than the population are rows drawn with replacement.

  Args:
    embeddings: `[V, H]` table, or a zero-argument loader returning it.
    population_size: sample from `embeddings[:population_size]`; `None` means
      the whole table. Larger than `V` is clipped to `V`.

  Returns:
    `init(rng, shape, dtype=float32)` for a `[P, H]` shape.
  """
  if population_size is not None and population_size <= 0:
    raise ValueError(f'population_size must be positive, got {population_size}.')

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    table = _resolve(embeddings)
    _check_feature_dim(table, shape, 'from_sample_of_embeddings')
    population = table.shape[0]
    if population_size is not None:
      if population_size > population:
        logger.warning(
            'population_size %d is larger than the embedding table (%d rows);'
            ' sampling from the whole table.',
            population_size,
            population,
        )
      population = min(population, population_size)
    replace = shape[0] > population
    if replace:
      logger.warning(
          'Prompt length %d is larger than the population (%d rows); sampling ' 'with replacement.',
          shape[0],
          population,
      )
    index = jax.random.choice(rng, population, (shape[0],), replace=replace)
    return _gather_rows(table[:population], index).astype(dtype)

  return init


def _embed_text(table: Array, vocab: Any, text: str) -> Tuple[np.ndarray, list]:
  ids = list(vocab.encode(text))
  if not ids:
    raise ValueError(f'Text {text!r} encodes to no tokens; cannot embed it.')
  if max(ids) >= table.shape[0]:
    raise ValueError(
        f'Text {text!r} encodes to ids {ids} but the embedding table has only '
        f'{table.shape[0]} rows; the vocabulary does not match the model.'
    )
  rows = np.asarray(table)[np.asarray(ids)].astype(np.float32)
  return rows, ids


def _default_fallback(embeddings: ArrayOrLoader) -> Initializer:
  return from_sample_of_embeddings(embeddings, DEFAULT_POPULATION_SIZE)


def from_embedded_list(
    embeddings: ArrayOrLoader,
    vocab: Any,
    texts: Sequence[str],
    initializer: Optional[Initializer] = None,
) -> Initializer:
  """ "Class label" init: position i is the embedding of `texts[i]`.

  A text that the vocabulary splits into several pieces gets the mean of the
  piece embeddings (`vocab.encode(text)`, no EOS). The remaining
  `P - len(texts)` positions come from `initializer(rng, (P - len(texts), H))`,
  by default sampled vocab from the 5000 most common tokens (the paper's
  recipe).

  Args:
    embeddings: `[V, H]` table, or a zero-argument loader returning it.
    vocab: a `seqio.Vocabulary` (anything with `encode(str) -> list[int]`).
    texts: the class labels (e.g. `['positive', 'negative']`).
    initializer: fills the positions after the labels.

  Returns:
    `init(rng, shape, dtype=float32)` for a `[P, H]` shape.

  Raises:
    ValueError (at init): more texts than prompt positions, a text that
      encodes to nothing, or mismatched feature sizes.
  """
  texts = [texts] if isinstance(texts, str) else list(texts)
  fallback = initializer

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    table = _resolve(embeddings)
    _check_feature_dim(table, shape, 'from_embedded_list')
    if len(texts) > shape[0]:
      raise ValueError(
          f'from_embedded_list got {len(texts)} texts ({texts}) but the '
          f'prompt has only {shape[0]} positions; increase PROMPT_LENGTH or '
          'pass fewer CLASS_LABELS.'
      )
    rows = [_embed_text(table, vocab, t)[0].mean(axis=0) for t in texts]
    labels = jnp.asarray(np.stack(rows)) if rows else jnp.zeros((0, shape[-1]), jnp.float32)
    rest = shape[0] - len(texts)
    if rest == 0:
      return labels.astype(dtype)
    fill = fallback if fallback is not None else _default_fallback(table)
    filler = jnp.asarray(fill(rng, (rest, shape[-1])), jnp.float32)
    return jnp.concatenate([labels, filler], axis=0).astype(dtype)

  return init


def from_embedded_string(
    embeddings: ArrayOrLoader, vocab: Any, text: str, initializer: Optional[Initializer] = None
) -> Initializer:
  """Init from a discrete prompt: position i is the embedding of piece i.

  `vocab.encode(text)` (no EOS) gives n pieces; the first `min(n, P)` positions
  are their embeddings (pieces beyond `P` are dropped with a warning) and the
  remaining positions come from `initializer(rng, (P - n, H))` (default:
  sampled vocab from the 5000 most common tokens).

  Args:
    embeddings: `[V, H]` table, or a zero-argument loader returning it.
    vocab: a `seqio.Vocabulary`.
    text: the string (e.g. a task description).
    initializer: fills the positions after the string.

  Returns:
    `init(rng, shape, dtype=float32)` for a `[P, H]` shape.
  """
  fallback = initializer

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    table = _resolve(embeddings)
    _check_feature_dim(table, shape, 'from_embedded_string')
    rows, ids = _embed_text(table, vocab, text)
    if len(ids) > shape[0]:
      logger.warning(
          'from_embedded_string: %r encodes to %d pieces but the prompt has %d'
          ' positions; the last %d pieces are dropped.',
          text,
          len(ids),
          shape[0],
          len(ids) - shape[0],
      )
      rows = rows[: shape[0]]
    head = jnp.asarray(rows)
    rest = shape[0] - rows.shape[0]
    if rest == 0:
      return head.astype(dtype)
    fill = fallback if fallback is not None else _default_fallback(table)
    filler = jnp.asarray(fill(rng, (rest, shape[-1])), jnp.float32)
    return jnp.concatenate([head, filler], axis=0).astype(dtype)

  return init


def from_array(
    prompt: Optional[ArrayOrLoader] = None, *, array: Optional[ArrayOrLoader] = None
) -> Initializer:
  """Init with a given value, e.g. a trained prompt from `np_load(path)`.

  The argument is called `prompt` as in google-research/prompt-tuning's gin
  files (`prompts.from_array.prompt = @prompts.np_load()`); `array=` is an
  alias.

  Args:
    prompt: `[P, H]` array or a zero-argument loader returning it.
    array: alias of `prompt`.

  Returns:
    `init(rng, shape, dtype=float32)`; raises `ValueError` naming both shapes
    when the array does not have the requested shape.
  """
  if (prompt is None) == (array is None):
    raise ValueError('from_array needs exactly one of `prompt` or `array`.')
  source = prompt if prompt is not None else array

  def init(rng: Array, shape: Shape, dtype: DType = jnp.float32) -> Array:
    del rng
    value = _resolve(source)
    if tuple(value.shape) != tuple(shape):
      hint = 'Check PROMPT_LENGTH and that the prompt was trained for this ' 'model size.'
      if np.ndim(value) == len(shape) + 1:
        hint = (
            f'It looks like a bank of {np.shape(value)[0]} prompts: serve it '
            'with --gin_file=prompts/bank_from_file.gin '
            f'--gin.NUM_PROMPTS={np.shape(value)[0]}.'
        )
      raise ValueError(
          f'The loaded prompt has shape {tuple(value.shape)} but the model '
          f'expects a prompt of shape {tuple(shape)} (PROMPT_LENGTH, embed '
          f'dim). {hint}'
      )
    return jnp.asarray(value, dtype)

  return init


# ============================================================================
# Modules
# ============================================================================


def infer_embed_dim(
    module: nn.Module, embed_dim: Optional[int], embedded: Optional[Array], name: str
) -> int:
  """H: `embed_dim` if given, else the embedded inputs' or the parameter's."""
  if embed_dim is not None:
    return embed_dim
  if embedded is not None:
    return embedded.shape[-1]
  if module.has_variable('params', name):
    return module.get_variable('params', name).shape[-1]
  raise ValueError(
      f'{type(module).__name__} cannot infer embed_dim: set `embed_dim` or '
      'call it with the embedded inputs.'
  )


class Prompt(nn.Module):
  """A learnable prompt: one `[length, embed_dim]` float32 parameter.

  The parameter is named `prompt` and has logical axes
  `('prompt', 'prompt_embed')`, which the partitioning rules leave replicated,
  so the whole prompt lives on every host and can be written as a `.npy`.

  Attributes:
    length: the prompt length P.
    prompt_init: `init(rng, (P, H)) -> array` (see the initializers above).
    embed_dim: H; inferred from the embedded inputs when `None`.
    dtype: activation dtype the prompt is cast to (the parameter stays f32).
    axis_names: logical axis names of the parameter.
  """

  length: int
  prompt_init: Initializer = uniform(0.5)
  embed_dim: Optional[int] = None
  dtype: DType = jnp.float32
  axis_names: Tuple[str, str] = PROMPT_AXES

  @nn.compact
  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
  ) -> Array:
    """Returns the prompt `[P, H]` cast to `dtype`.

    Args:
      tokens: `[B, L]` input tokens (unused; part of the prompt interface).
      embedded: `[B, L, H]` embedded inputs, used only to infer H.
      prompt_ids: ignored (a single prompt serves every example).
    """
    del tokens, prompt_ids
    embed_dim = infer_embed_dim(self, self.embed_dim, embedded, 'prompt')
    shape = (self.length, embed_dim)
    init_fn = self.prompt_init

    def checked_init(rng, shape):
      value = jnp.asarray(init_fn(rng, shape), jnp.float32)
      if value.shape != tuple(shape):
        raise ValueError(f'prompt_init returned shape {value.shape}, expected ' f'{tuple(shape)}.')
      return value

    prompt = partitioning.param_with_axes(
        'prompt', checked_init, shape, axes=tuple(self.axis_names)
    )
    return jnp.asarray(prompt, self.dtype)


class InferenceOnlyPrompt(nn.Module):
  """A prompt held as a constant rather than a parameter (serving only).

  Attributes:
    length: the prompt length P.
    embed_dim: H.
    prompt_init: produces the value (typically `from_array(np_load(path))`);
      called with a fixed key, once per trace.
    dtype: activation dtype.
  """

  length: int
  embed_dim: int
  prompt_init: Initializer
  dtype: DType = jnp.float32

  def __call__(
      self,
      tokens: Optional[Array] = None,
      embedded: Optional[Array] = None,
      prompt_ids: Optional[Array] = None,
  ) -> Array:
    """Returns the constant prompt `[P, H]` cast to `dtype`."""
    del tokens, embedded, prompt_ids
    value = self.prompt_init(jax.random.PRNGKey(0), (self.length, self.embed_dim))
    return jnp.asarray(value, self.dtype)


# ============================================================================
# Combine functions: where the prompt goes in the embedded input.
# ============================================================================


def _real_lengths(tokens: Array) -> Array:
  """Index after the last non-padding token of each row: `[B]` int32."""
  tokens = jnp.asarray(tokens)
  positions = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.int32)
  return jnp.max(jnp.where(tokens != 0, positions[None, :], 0), axis=1)


def insert_prompt(prompt: Array, embedded: Array, insert_at: Array) -> Array:
  """Inserts `prompt` into `embedded` before position `insert_at[b]` per row.

  Output row b, position j (`k = insert_at[b]`, `P` = prompt length):
  `embedded[b, j]` for `j < k`, `prompt[b, j - k]` for `k <= j < k + P` and
  `embedded[b, j - P]` for `j >= k + P`.

  Args:
    prompt: `[B, P, ...]`.
    embedded: `[B, L, ...]` (same trailing dims).
    insert_at: `[B]` int in `[0, L]`.

  Returns:
    `[B, P + L, ...]`.
  """
  prompt = jnp.asarray(prompt)
  embedded = jnp.asarray(embedded)
  p, l = prompt.shape[1], embedded.shape[1]
  source = jnp.concatenate([prompt.astype(embedded.dtype), embedded], axis=1)
  j = jnp.arange(p + l, dtype=jnp.int32)[None, :]
  k = jnp.asarray(insert_at, jnp.int32)[:, None]
  index = jnp.where(j < k, p + j, jnp.where(j < k + p, j - k, j))
  index = index.reshape(index.shape + (1,) * (source.ndim - 2))
  return jnp.take_along_axis(source, index, axis=1)


def prefix_prompt(prompt: Array, embedded: Array, tokens: Array) -> Array:
  """`[prompt, inputs]`: the prompt goes first (Lester et al.).

  Args:
    prompt: `[B, P, H]`.
    embedded: `[B, L, H]`.
    tokens: `[B, L]` (unused).

  Returns:
    `[B, P + L, H]`.
  """
  del tokens
  return jnp.concatenate([jnp.asarray(prompt, embedded.dtype), embedded], axis=1)


def prefix_prompt_after_bos(prompt: Array, embedded: Array, tokens: Array) -> Array:
  """`[inputs[:1], prompt, inputs[1:]]`: the prompt after the first token.

  For inputs that start with a BOS token (decoder-only LMs).

  Args:
    prompt: `[B, P, H]`.
    embedded: `[B, L, H]`.
    tokens: `[B, L]` (unused).

  Returns:
    `[B, P + L, H]`.
  """
  del tokens
  return jnp.concatenate(
      [embedded[:, :1], jnp.asarray(prompt, embedded.dtype), embedded[:, 1:]], axis=1
  )


def _suffix_insert_at(tokens: Array, before_eos: bool, eos_id: int) -> Array:
  n = _real_lengths(tokens)
  if not before_eos:
    return n
  tokens = jnp.asarray(tokens)
  last = jnp.take_along_axis(tokens, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
  return jnp.where((n > 0) & (last == eos_id), n - 1, n)


def suffix_prompt(
    prompt: Array, embedded: Array, tokens: Array, before_eos: bool = False, eos_id: int = EOS_ID
) -> Array:
  """The prompt right after the real tokens, padding moved after the prompt.

  Let `n` be the index after the last non-padding token of a row
  (`tokens != 0`). The row becomes `[inputs[:k], prompt, inputs[k:]]` with
  `k = n`, so real tokens and the prompt are contiguous and the padding
  (`inputs[n:]`) comes last. With `before_eos=True` and the last real token
  equal to `eos_id`, `k = n - 1`: `[inputs[:n-1], prompt, EOS, padding]`
  (rows not ending in EOS behave as `before_eos=False`).

  Example (P=2, prompt `p`, tokens `[5, 6, 1, 0]`):
  `before_eos=False -> [5, 6, 1, p0, p1, 0]`,
  `before_eos=True -> [5, 6, p0, p1, 1, 0]`.

  Args:
    prompt: `[B, P, H]`.
    embedded: `[B, L, H]`.
    tokens: `[B, L]` int, 0 is padding.
    before_eos: put the prompt before a final EOS.
    eos_id: the EOS id.

  Returns:
    `[B, P + L, H]`.
  """
  return insert_prompt(prompt, embedded, _suffix_insert_at(tokens, before_eos, eos_id))


# ----- mask counterparts: `[B, L]` -> `[B, P + L]`, prompt positions True -----


def _prompt_true(mask: Array, prompt_length: int) -> Array:
  return jnp.ones((mask.shape[0], prompt_length), bool)


def prefix_prompt_mask(tokens: Array, mask: Array, prompt_length: int) -> Array:
  """Mask layout of `prefix_prompt`: `[True]*P + mask`."""
  del tokens
  mask = jnp.asarray(mask, bool)
  return jnp.concatenate([_prompt_true(mask, prompt_length), mask], axis=1)


def prefix_prompt_after_bos_mask(tokens: Array, mask: Array, prompt_length: int) -> Array:
  """Mask layout of `prefix_prompt_after_bos`."""
  del tokens
  mask = jnp.asarray(mask, bool)
  return jnp.concatenate([mask[:, :1], _prompt_true(mask, prompt_length), mask[:, 1:]], axis=1)


def suffix_prompt_mask(
    tokens: Array, mask: Array, prompt_length: int, before_eos: bool = False, eos_id: int = EOS_ID
) -> Array:
  """Mask layout of `suffix_prompt` (same `before_eos`/`eos_id`)."""
  mask = jnp.asarray(mask, bool)
  return insert_prompt(
      _prompt_true(mask, prompt_length), mask, _suffix_insert_at(tokens, before_eos, eos_id)
  )


# Known combine functions and their mask counterparts.
MASK_FUNCTIONS = {
    prefix_prompt: prefix_prompt_mask,
    prefix_prompt_after_bos: prefix_prompt_after_bos_mask,
    suffix_prompt: suffix_prompt_mask,
}


def combine_mask(combine: CombineFn, tokens: Array, mask: Array, prompt_length: int) -> Array:
  """Where `combine` puts the prompt: `[B, L]` bool -> `[B, P + L]` bool.

  Prompt positions are True and the others carry `mask`. The layout is
  computed by running `combine` itself on the mask (`H = 1`), so it is exact
  for any combine function, including gin-configured or user-written ones
  (`suffix_prompt` with a gin-bound `before_eos`, ...).

  Args:
    combine: a combine function `(prompt, embedded, tokens) -> combined`.
    tokens: `[B, L]` int.
    mask: `[B, L]` bool.
    prompt_length: P.

  Returns:
    `[B, P + L]` bool.
  """
  mask = jnp.asarray(mask)
  values = mask.astype(jnp.float32)[..., None]
  ones = jnp.ones((mask.shape[0], prompt_length, 1), jnp.float32)
  return combine(ones, values, tokens)[..., 0] > 0.5
