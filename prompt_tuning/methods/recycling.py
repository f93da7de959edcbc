"""Prompt recycling (Lester, Yurtsever, Shakeri, Constant 2022): a prompt of one backbone for another.

A recycler is fit on the two backbones' embeddings of one shared vocabulary, S `[V, E]` (source) and
T `[V, E₂]` (target), and maps a source prompt P `[L, E]` to a target prompt P′ `[L, E₂]` without
task data or training on the target (google-research/prompt-tuning `recycling/recycle.py`):

* ``v2v-lin`` (`TFLstSqRecycler`): X = argmin ‖S X − T‖ (least squares, E × E₂); P′ = P X.
* ``lin-comb`` (`LinearCombinationRecycler`): C = the minimum-norm solution of Sᵀ C = Pᵀ (the prompt
  as a combination of source token embeddings); P′ = Cᵀ T. Algebraically equal to v2v-lin when S has
  full column rank (differences are round-off).
* ``v2v-nn`` (`JaxRecycler`): a ReLU MLP E → 4·E₂ → E₂ (Flax default init from `PRNGKey(0)`),
  trained with Adam (lr 3e-4), batch 50, 25 epochs, each epoch shuffled by
  `argsort(uniform(shuffle_rng, (V,)))` with `shuffle_rng, rng = split(rng)`, on the loss
  `optax.l2_loss(pred, target).mean()` (half the mean squared error); P′ = MLP(P).

The shared vocabulary (`recycling_vocabulary`) follows the original's filtering: English-only
pieces (here: pieces that, without SentencePiece's word-boundary mark, are ASCII letters only,
excluding control, unknown and sentinel pieces), in id order, then `num_words` of them starting at
`word_offset` (the original: 4000 at offset 1000 of its `filtered-vocab-english-only.json`, which
can be given as `vocab_file` instead: `{id: piece}`).

`python -m prompt_tuning.recycle` (`main`) recycles a `.npy` or `library:NAME` prompt to a file or
library entry (recording the target's fingerprint) and can evaluate it with rank classification.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from prompt_tuning import fs

RECYCLERS = ('v2v-lin', 'lin-comb', 'v2v-nn')
DEFAULT_NUM_WORDS = 4000
DEFAULT_WORD_OFFSET = 1000
_LETTERS = set(string.ascii_letters)


class RecyclingError(ValueError):
  """Recycling inputs that do not fit (shapes, vocabulary, recycler name)."""


# ----------------------------------------------------------------------------------------------
# The shared vocabulary.
# ----------------------------------------------------------------------------------------------


def is_english_piece(piece: str) -> bool:
  """Whether a SentencePiece piece is an English-only word piece (ASCII letters, after the `▁`)."""
  text = piece.replace('\u2581', '')
  return bool(text) and all(c in _LETTERS for c in text)


def english_only_ids(vocabulary: Any) -> List[int]:
  """Ids of the English-only pieces of a `seqio.SentencePieceVocabulary`, in id order.

  Control, unknown and user-defined pieces (pad, EOS, UNK, sentinels) are excluded.
  """
  model = vocabulary.tokenizer
  ids = []
  for i in range(model.get_piece_size()):
    if model.is_control(i) or model.is_unknown(i) or model.is_unused(i):
      continue
    if is_english_piece(model.id_to_piece(i)):
      ids.append(i)
  return ids


def recycling_vocabulary(
    vocabulary: Any = None,
    *,
    vocab_file: Optional[str] = None,
    num_words: int = DEFAULT_NUM_WORDS,
    word_offset: int = DEFAULT_WORD_OFFSET,
) -> np.ndarray:
  """Ids of the shared vocabulary the recyclers are fit on: positions `[word_offset, word_offset +
  num_words)` of the English-only pieces (or of the ids in `vocab_file`, `{id: piece}` JSON);
  `num_words=0` takes every piece from `word_offset` on.

  Raises:
    RecyclingError: fewer pieces than `word_offset + num_words`.
  """
  if vocab_file:
    ids = sorted(int(k) for k in json.loads(fs.read_text(vocab_file)))
  elif vocabulary is not None:
    ids = english_only_ids(vocabulary)
  else:
    raise RecyclingError('Give a vocabulary (or vocab_file) to choose the shared pieces.')
  if word_offset < 0 or num_words < 0:
    raise RecyclingError(f'num_words and word_offset must be >= 0 ({num_words}, {word_offset}).')
  if not num_words:  # 0: every piece from the offset on
    num_words = len(ids) - word_offset
  if num_words <= 0 or word_offset + num_words > len(ids):
    raise RecyclingError(
        f'The vocabulary has {len(ids)} English-only pieces, fewer than word_offset '
        f'({word_offset}) + num_words ({num_words}); lower them (e.g. --word_offset=0 '
        f'--num_words={len(ids)}).'
    )
  return np.asarray(ids[word_offset : word_offset + num_words], np.int64)


# ----------------------------------------------------------------------------------------------
# Recyclers.
# ----------------------------------------------------------------------------------------------


def _check(source: np.ndarray, target: np.ndarray) -> None:
  if source.ndim != 2 or target.ndim != 2 or source.shape[0] != target.shape[0]:
    raise RecyclingError(
        f'Recyclers are fit on paired embeddings [V, E] and [V, E2] of the same V pieces; got '
        f'{source.shape} and {target.shape}.'
    )


def fit_v2v_lin(source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """X `[E, E₂]` minimizing ‖S X − T‖ (float64 least squares)."""
  _check(source, target)
  x, *_ = np.linalg.lstsq(
      np.asarray(source, np.float64), np.asarray(target, np.float64), rcond=None
  )
  return x


def recycle_lin_comb(prompt: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
  """P′ = Cᵀ T with C the minimum-norm solution of Sᵀ C = Pᵀ."""
  _check(source, target)
  coeffs, *_ = np.linalg.lstsq(
      np.asarray(source, np.float64).T, np.asarray(prompt, np.float64).T, rcond=None
  )
  return coeffs.T @ np.asarray(target, np.float64)


@dataclasses.dataclass
class V2VNN:
  """The v2v-nn recycler: a trained ReLU MLP (see the module docstring for the recipe)."""

  hidden_scale: int = 4
  learning_rate: float = 3e-4
  batch_size: int = 50
  epochs: int = 25
  seed: int = 0
  losses: List[float] = dataclasses.field(default_factory=list)  # mean loss of each epoch
  steps: int = 0
  _params: Any = None
  _apply: Any = None

  def fit(self, source: np.ndarray, target: np.ndarray) -> 'V2VNN':
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    _check(source, target)
    out_dim = target.shape[1]
    hidden = self.hidden_scale * out_dim

    class ReLUMLP(nn.Module):

      @nn.compact
      def __call__(self, x):
        return nn.Dense(out_dim)(nn.relu(nn.Dense(hidden)(x)))

    mlp = ReLUMLP()
    rng = jax.random.PRNGKey(self.seed)
    params = mlp.init(rng, jnp.ones((1, source.shape[1])))
    optimizer = optax.adam(self.learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
      def loss_fn(p):
        return optax.l2_loss(mlp.apply(p, x), y).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    xs = jnp.asarray(source, jnp.float32)
    ys = jnp.asarray(target, jnp.float32)
    n = xs.shape[0]
    self.losses, self.steps = [], 0
    for _ in range(self.epochs):
      shuffle_rng, rng = jax.random.split(rng)
      perm = jnp.argsort(jax.random.uniform(shuffle_rng, (n,)))
      total, count = 0.0, 0
      for start in range(0, n, self.batch_size):
        idx = perm[start : start + self.batch_size]
        params, opt_state, loss = step(params, opt_state, xs[idx], ys[idx])
        total += float(loss) * int(idx.shape[0])
        count += int(idx.shape[0])
        self.steps += 1
      self.losses.append(total / count)
    self._params, self._apply = params, mlp.apply
    return self

  def __call__(self, prompt: np.ndarray) -> np.ndarray:
    if self._params is None:
      raise RecyclingError('Fit the v2v-nn recycler before applying it.')
    return np.asarray(self._apply(self._params, np.asarray(prompt, np.float32)), np.float64)


def recycle(
    prompt: np.ndarray,
    source_embeddings: np.ndarray,
    target_embeddings: np.ndarray,
    recycler: str = 'v2v-lin',
    **nn_options: Any,
) -> np.ndarray:
  """The recycled prompt `[L, E₂]` (float32) of `prompt` `[L, E]`.

  Args:
    prompt: the source prompt.
    source_embeddings: S, the source backbone's rows of the shared vocabulary.
    target_embeddings: T, the target's rows of the same ids.
    recycler: 'v2v-lin', 'lin-comb' or 'v2v-nn'.
    **nn_options: `V2VNN` fields for 'v2v-nn'.
  """
  prompt = np.asarray(prompt)
  if prompt.ndim != 2 or prompt.shape[1] != np.shape(source_embeddings)[1]:
    raise RecyclingError(
        f'The prompt has shape {prompt.shape} but the source embeddings have '
        f'{np.shape(source_embeddings)[1]} features: is it a prompt of the source backbone?'
    )
  if recycler == 'v2v-lin':
    out = np.asarray(prompt, np.float64) @ fit_v2v_lin(source_embeddings, target_embeddings)
  elif recycler == 'lin-comb':
    out = recycle_lin_comb(prompt, source_embeddings, target_embeddings)
  elif recycler == 'v2v-nn':
    out = V2VNN(**nn_options).fit(source_embeddings, target_embeddings)(prompt)
  else:
    raise RecyclingError(f'Unknown recycler {recycler!r}; choose one of {", ".join(RECYCLERS)}.')
  return out.astype(np.float32)


def read_embedding(checkpoint: str) -> np.ndarray:
  """A backbone's `token_embedder/embedding` (only that variable is read)."""
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten_params(
      formats.load_params(checkpoint, variables=['token_embedder/embedding'])
  )
  return np.asarray(flat['token_embedder/embedding'], np.float32)


# ----------------------------------------------------------------------------------------------
# Command line: python -m prompt_tuning.recycle
# ----------------------------------------------------------------------------------------------


def _vocabulary(spec: Optional[str]):
  """A seqio vocabulary from `module:function` (e.g. `tasks.toy:get_toy_vocabulary`) or a
  SentencePiece model file."""
  if not spec:
    return None
  if re.match(r'^[\w.]+:\w+$', spec):
    import importlib  # pylint: disable=g-import-not-at-top

    module, fn = spec.split(':')
    return getattr(importlib.import_module(module), fn)()
  import seqio  # pylint: disable=g-import-not-at-top

  return seqio.SentencePieceVocabulary(spec)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """`python -m prompt_tuning.recycle`; returns the exit code."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from prompt_tuning import library  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog='python -m prompt_tuning.recycle',
      description='Recycle a prompt trained on one backbone to another (Lester et al. 2022).',
  )
  parser.add_argument('--prompt', required=True, help='.npy file or library:NAME (of the source)')
  parser.add_argument('--source', required=True, help='the source backbone checkpoint')
  parser.add_argument('--target', required=True, help='the target backbone checkpoint')
  parser.add_argument('--recycler', default='v2v-lin', choices=RECYCLERS)
  parser.add_argument('--output', help='.npy file or library:NAME for the recycled prompt')
  parser.add_argument('--library', help='library of library:NAME prompts (LIBRARY_DIR)')
  parser.add_argument(
      '--vocabulary',
      help='SentencePiece model file or module:function returning a seqio vocabulary',
  )
  parser.add_argument('--vocab_file', help='JSON {id: piece} of the shared vocabulary')
  parser.add_argument('--num_words', type=int, default=DEFAULT_NUM_WORDS, help='0: all')
  parser.add_argument('--word_offset', type=int, default=DEFAULT_WORD_OFFSET)
  parser.add_argument('--seed', type=int, default=0, help='v2v-nn initialization and shuffling')
  parser.add_argument('--eval_task', help='evaluate with rank classification on this seqio task')
  parser.add_argument('--eval_module', help='module registering the task (e.g. tasks.toy)')
  parser.add_argument('--eval_split', default='validation')
  parser.add_argument('--class_labels', help='comma-separated candidate labels')
  parser.add_argument('--input_length', type=int, default=64)
  parser.add_argument('--num_examples', type=int)
  args = parser.parse_args(argv)
  try:
    if args.library:
      import os  # pylint: disable=g-import-not-at-top

      os.environ[library.ENV_VAR] = args.library
    if library.is_ref(args.prompt):
      entry = library.load_entry(args.prompt, args.library, backbone=args.source)
      prompt, source_meta = entry.array, dict(entry.metadata)
    else:
      with fs.open(args.prompt, 'rb') as f:
        prompt, source_meta = np.load(f, allow_pickle=False), {}
    ids = recycling_vocabulary(
        _vocabulary(args.vocabulary),
        vocab_file=args.vocab_file,
        num_words=args.num_words,
        word_offset=args.word_offset,
    )
    source, target = read_embedding(args.source), read_embedding(args.target)
    for name, table in (('source', source), ('target', target)):
      if ids.max() >= table.shape[0]:
        raise RecyclingError(
            f'The shared vocabulary has id {ids.max()} but the {name} embedding has only '
            f'{table.shape[0]} rows: the two backbones must share the vocabulary.'
        )
    options = {'seed': args.seed} if args.recycler == 'v2v-nn' else {}
    recycled = recycle(prompt, source[ids], target[ids], args.recycler, **options)
    print(f'recycled {args.prompt} {tuple(prompt.shape)} with {args.recycler} on {len(ids)} pieces')
    if args.output:
      if library.is_ref(args.output):
        meta = {
            'task': source_meta.get('task'),
            'method': f'recycled/{args.recycler}',
            'recycled_from': args.prompt,
            'source_backbone': args.source,
            'num_words': int(len(ids)),
            'word_offset': args.word_offset,
        }
        library.Library(library.default_library_dir(args.library)).add(
            library.parse_ref(args.output), recycled, meta, backbone=args.target, overwrite=True
        )
      else:
        import io  # pylint: disable=g-import-not-at-top

        buffer = io.BytesIO()
        np.save(buffer, recycled)
        fs.write_bytes(args.output, buffer.getvalue())
      print(f'wrote {args.output}')
    if args.eval_task:
      from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top
      from prompt_tuning.methods import ensembling  # pylint: disable=g-import-not-at-top

      if not args.class_labels:
        raise RecyclingError('--eval_task needs --class_labels (the candidates to rank).')
      labels = args.class_labels.split(',')
      data = ensembling.task_arrays(
          args.eval_task, args.eval_split, args.input_length, args.num_examples, args.eval_module
      )
      gold = ensembling.labels_index(data['targets'], labels)
      cands = ensembling.candidate_tokens(data['vocabulary'], labels)
      results = {}
      for name, backbone, value in (
          ('source', args.source, prompt),
          ('recycled', args.target, recycled),
          ('target_zero_shot', args.target, None),
      ):
        params = formats.load_params(backbone)
        model, full = ensembling.prompted_model(params, value, data['vocabulary'])
        scores = ensembling.score_candidates(model, full, data['encoder_input_tokens'], cands)
        results[name] = ensembling.rank_classification_accuracy(scores, gold)
      print('RESULTS ' + json.dumps(results))
  except (RecyclingError, library.LibraryError, ValueError, FileNotFoundError, KeyError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f'ERROR: {type(e).__name__}: {msg}', file=sys.stderr)
    return 1
  return 0
