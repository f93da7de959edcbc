"""Prompt ensembling (Lester et al. 2021, §6): N prompts of one task, one frozen model, one pass.

Each example is replicated N times in a `PromptBank` batch (copy i gets `prompt_ids = i`), so the
N prompts are evaluated together, and their predictions are combined:

* ``majority``: majority vote over the members' predictions (their texts in `EnsembleEvaluator`;
  their token sequences inside `EnsembleModel`'s compiled step, which is the same unless distinct
  token sequences spell one text). Ties go to the tied prediction that the lowest-index member
  made (the paper does not say; this makes the rule deterministic).
* ``mean_score``: rank classification with the task's class labels: each class's log-likelihood is
  averaged over the N prompts and the best class wins (members predict by their own scores).

From gin: `configs/runs/ensemble_eval.gin` (after `runs/prompt_eval.gin`) sets
`ENSEMBLE = ['library:sst2_a', 'prompt_b.npy', ...]`: the model becomes a bank of those prompts
(`bank_init`) and `EnsembleEvaluator` (a `seqio.Evaluator`) runs the one pass and reports, per task,
each member's metrics, their mean and best, and the ensemble's, as the paper's Table 3
(`ensemble_table`; also written to `EVAL_OUTPUT_DIR/ensemble.json`). `configs/runs/ensemble_infer.gin`
does the same for `python -m prompt_tuning.infer` through `EnsembleModel`, a model wrapper that
replicates, predicts and votes inside the compiled step.

The rank-classification helpers (`task_arrays`, `score_candidates`, `rank_classification_accuracy`)
are shared with SPoT and recycling, which evaluate prompts the same way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from prompt_tuning import fs

RULES = ('majority', 'mean_score')


# ----------------------------------------------------------------------------------------------
# Combination rules.
# ----------------------------------------------------------------------------------------------


def _key(prediction: Any) -> Tuple:
  arr = np.asarray(prediction).reshape(-1)
  return tuple(int(x) for x in arr) if arr.dtype.kind in 'iub' else tuple(arr.tolist())


def majority_vote(predictions: Sequence[Sequence[Any]]) -> List[Any]:
  """Majority vote per example.

  Args:
    predictions: `[num_examples][num_members]` predictions (token sequences, strings or class
      ids; compared for exact equality, token sequences after removing trailing padding 0s).

  Returns:
    Per example, the most frequent prediction; among equally frequent ones, the one the
    lowest-index member made.
  """
  out = []
  for members in predictions:
    keys = [_strip(_key(p)) for p in members]
    counts: Dict[Tuple, int] = {}
    for k in keys:
      counts[k] = counts.get(k, 0) + 1
    best = max(range(len(keys)), key=lambda i: (counts[keys[i]], -i))
    out.append(members[best])
  return out


def _strip(key: Tuple) -> Tuple:
  key = list(key)
  while key and key[-1] == 0:
    key.pop()
  return tuple(key)


def decode_prediction(vocabulary: Any, tokens: Sequence[int]) -> str:
  """The text of predicted tokens, as `prompt_tuning.infer` writes it (cut at EOS, no padding)."""
  tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
  eos = getattr(vocabulary, 'eos_id', None)
  if eos is not None and eos in tokens:
    tokens = tokens[: tokens.index(eos)]
  return vocabulary.decode([t for t in tokens if t > 0])


def mean_score_vote(scores: np.ndarray) -> np.ndarray:
  """`scores [num_examples, num_members, num_classes]` -> `[num_examples]` argmax of the mean over
  members (ties to the lowest class index)."""
  scores = np.asarray(scores, np.float64)
  return np.argmax(scores.mean(axis=1), axis=-1)


def replicate(batch: Mapping[str, np.ndarray], num_prompts: int) -> Dict[str, np.ndarray]:
  """Each example N times: row `b * N + i` is example b with `prompt_ids = i`."""
  out = {}
  size = None
  for key, value in batch.items():
    value = np.asarray(value)
    if value.ndim >= 1:
      size = value.shape[0]
      out[key] = np.repeat(value, num_prompts, axis=0)
    else:
      out[key] = value
  if size is None:
    raise ValueError('replicate needs batched features.')
  out['prompt_ids'] = np.tile(np.arange(num_prompts, dtype=np.int32), size)
  return out


# ----------------------------------------------------------------------------------------------
# Rank classification of prompts (shared with SPoT and recycling).
# ----------------------------------------------------------------------------------------------


def task_arrays(
    task_name: str,
    split: str,
    input_length: int,
    num_examples: Optional[int] = None,
    module: Optional[str] = None,
) -> Dict[str, Any]:
  """`{'encoder_input_tokens' [n, L] int32, 'targets': [n] str, 'vocabulary'}` of a seqio task."""
  import seqio  # pylint: disable=g-import-not-at-top

  if module:
    import importlib  # pylint: disable=g-import-not-at-top

    importlib.import_module(module)
  task = seqio.get_mixture_or_task(task_name)
  ds = task.get_dataset(
      sequence_length={'inputs': input_length, 'targets': 64},
      split=split,
      shuffle=False,
      num_epochs=1,
      use_cached=False,
  )
  tokens, targets = [], []
  for ex in ds.as_numpy_iterator():
    ids = list(ex['inputs'])[:input_length]
    tokens.append(ids + [0] * (input_length - len(ids)))
    text = ex.get('targets_pretokenized')
    targets.append(text.decode('utf-8') if isinstance(text, bytes) else str(text))
    if num_examples is not None and len(tokens) >= num_examples:
      break
  return {
      'encoder_input_tokens': np.asarray(tokens, np.int32),
      'targets': targets,
      'vocabulary': task.output_features['targets'].vocabulary,
  }


def candidate_tokens(vocabulary: Any, class_labels: Sequence[str]) -> np.ndarray:
  """`[C, T]` EOS-terminated, 0-padded token ids of the class labels."""
  from prompt_tuning.runtime import rank_classification  # pylint: disable=g-import-not-at-top

  return rank_classification.pad_candidates(
      [vocabulary.encode(label) for label in class_labels], eos_id=vocabulary.eos_id
  )


def score_candidates(
    model: Any,
    params: Any,
    encoder_input_tokens: np.ndarray,
    candidates: np.ndarray,
    *,
    num_prompts: Optional[int] = None,
    batch_size: int = 32,
) -> np.ndarray:
  """Log-likelihood of every candidate target, for every example (and every prompt of a bank).

  Args:
    model: an `EncoderDecoderModel` (its `score_batch`).
    params: its parameters (with a `PromptBank` of `num_prompts` prompts when given).
    encoder_input_tokens: `[n, L]`.
    candidates: `[C, T]` (`candidate_tokens`).
    num_prompts: with a prompt bank, every example is scored with each prompt (one pass).
    batch_size: examples per compiled step.

  Returns:
    `[n, C]`, or `[n, N, C]` with `num_prompts`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import rank_classification  # pylint: disable=g-import-not-at-top

  score = jax.jit(model.score_batch)
  n = encoder_input_tokens.shape[0]
  reps = num_prompts or 1
  num_cands = candidates.shape[0]
  out = []
  for start in range(0, n, batch_size):
    chunk = encoder_input_tokens[start : start + batch_size]
    real = chunk.shape[0]
    if real < batch_size:  # one compiled shape for every batch
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
    batch = {'encoder_input_tokens': chunk}
    if num_prompts:
      batch = replicate(batch, num_prompts)
    expanded = rank_classification.build_rank_classification_batch(batch, candidates)
    scores = np.asarray(jax.device_get(score(params, expanded)), np.float64)
    out.append(scores.reshape(batch_size, reps, num_cands)[:real])
  scores = np.concatenate(out, axis=0)
  return scores if num_prompts else scores[:, 0]


def labels_index(targets: Sequence[str], class_labels: Sequence[str]) -> np.ndarray:
  """Index of each target string in `class_labels` (-1 when it is none of them)."""
  lookup = {label: i for i, label in enumerate(class_labels)}
  return np.asarray([lookup.get(t.strip(), -1) for t in targets], np.int64)


def rank_classification_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
  """Percent of examples whose best-scoring candidate is the label (`scores [n, C]`)."""
  return 100.0 * float(np.mean(np.argmax(scores, axis=-1) == labels))


def prompted_model(params: Mapping[str, Any], prompt: Optional[np.ndarray], vocabulary: Any):
  """`(model, params)`: the backbone of `params` (config read from its shapes, no dropout) with
  `prompt` (`[P, H]`, or a `[N, P, H]` bank; None: no prompt) in its encoder, as an
  `EncoderDecoderModel`."""
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top

  flat = {k: v for k, v in params_lib.flatten_params(params).items() if '/prompt/' not in f'/{k}/'}
  config = t5.config_from_shapes(flat, dropout_rate=0.0)
  if prompt is None:
    model = models.EncoderDecoderModel(t5.EncoderDecoder(config), vocabulary, vocabulary)
    return model, params_lib.unflatten_params(flat)
  prompt = np.asarray(prompt, np.float32)
  bank = prompt.ndim == 3
  module = prompted.PromptEncoderDecoder(
      config,
      prompt_length=prompt.shape[-2],
      num_prompts=prompt.shape[0] if bank else None,
  )
  flat['encoder/prompt/prompt/prompt'] = prompt
  model = models.EncoderDecoderModel(module, vocabulary, vocabulary)
  return model, params_lib.unflatten_params(flat)


# ----------------------------------------------------------------------------------------------
# Table 3.
# ----------------------------------------------------------------------------------------------


def ensemble_table(
    member_metrics: Sequence[Mapping[str, float]], ensemble_metrics: Mapping[str, float]
) -> Dict[str, Dict[str, float]]:
  """`{metric: {'members': [...], 'mean': ..., 'best': ..., 'ensemble': ...}}` (the paper's
  Table 3: average and best of the N prompts, and their ensemble)."""
  table = {}
  for name in ensemble_metrics:
    values = [float(m[name]) for m in member_metrics if name in m]
    if not values:
      continue
    table[name] = {
        'members': values,
        'mean': float(np.mean(values)),
        'best': float(np.max(values)),
        'ensemble': float(ensemble_metrics[name]),
    }
  return table


def format_table(task: str, table: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
  lines = [f'{task}: {len(names)} prompts']
  for metric, row in table.items():
    members = ', '.join(f'{n}={v:.2f}' for n, v in zip(names, row['members']))
    lines.append(
        f'  {metric}: mean {row["mean"]:.2f}, best {row["best"]:.2f}, ensemble '
        f'{row["ensemble"]:.2f} ({members})'
    )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# The ensemble from gin: a bank of the member prompts.
# ----------------------------------------------------------------------------------------------


def ensemble_size(prompts: Sequence[str]) -> int:
  """N, the number of members of `ENSEMBLE` (gin: `NUM_PROMPTS = @ensembling.ensemble_size()`)."""
  if not prompts or isinstance(prompts, str):
    raise ValueError(
        "ENSEMBLE must be a list of prompts (.npy files or 'library:NAME'), e.g. "
        "--gin.ENSEMBLE=\"['library:sst2_a', 'library:sst2_b', 'library:sst2_c']\"."
    )
  return len(prompts)


def member_length(prompts: Sequence[str], library_dir: Optional[str] = None) -> int:
  """P, the length of the first member (gin: `PROMPT_LENGTH = @ensembling.member_length()`)."""
  from prompt_tuning import prompts as prompts_lib  # pylint: disable=g-import-not-at-top

  ensemble_size(prompts)
  return int(np.shape(prompts_lib.np_load(prompts[0], library_dir=library_dir))[-2])


def load_members(
    prompts: Sequence[str], library_dir: Optional[str] = None, backbone: Any = None
) -> np.ndarray:
  """`[N, P, H]`: the members (`.npy` files or `library:NAME`, checked against `backbone`)."""
  from prompt_tuning import prompts as prompts_lib  # pylint: disable=g-import-not-at-top

  arrays = [
      np.asarray(prompts_lib.np_load(p, library_dir=library_dir, backbone=backbone))
      for p in prompts
  ]
  for p, a in zip(prompts, arrays):
    if a.ndim != 2 or a.shape != arrays[0].shape:
      raise ValueError(
          f'Ensemble member {p} has shape {a.shape}, but {prompts[0]} has {arrays[0].shape}: the '
          'members of an ensemble are prompts of one length for one backbone.'
      )
  return np.stack(arrays).astype(np.float32)


def bank_init(
    prompts: Sequence[str], library_dir: Optional[str] = None, backbone: Any = None
) -> Callable[..., Any]:
  """A `PromptBank.bank_init` holding the members (read when the parameters are initialized)."""

  def init(rng, shape, dtype=np.float32):
    del rng
    value = load_members(prompts, library_dir, backbone)
    if tuple(value.shape) != tuple(shape):
      raise ValueError(
          f'The ensemble members stack to {tuple(value.shape)} but the model expects '
          f'{tuple(shape)} (NUM_PROMPTS, PROMPT_LENGTH, embed): set PROMPT_LENGTH to the '
          "members' length."
      )
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    return jnp.asarray(value, dtype)

  return init


def _expand_dataset(ds: Any, num_prompts: int, candidates: Optional[np.ndarray] = None):
  """The enumerated model dataset with every example N times (`prompt_ids`), and with
  `candidates` every copy C times more with the candidate as its target: index `(i*N + n)*C + c`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  n = num_prompts
  c = 1 if candidates is None else candidates.shape[0]
  if candidates is not None:
    _, spec = ds.element_spec
    length = int(spec['decoder_target_tokens'].shape[-1])
    if candidates.shape[1] > length:
      raise ValueError(
          f'A class label has {candidates.shape[1]} tokens, more than the targets length {length}.'
      )
    padded = np.zeros((c, length), np.int32)
    padded[:, : candidates.shape[1]] = candidates
    targets = np.tile(padded, (n, 1))  # row n*C + c: candidate c
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    cand = {
        'decoder_target_tokens': tf.constant(targets),
        'decoder_input_tokens': tf.constant(inputs),
        'decoder_loss_weights': tf.constant((targets > 0).astype(np.int32)),
    }

  def expand(index, example):
    rows = n * c
    ids = index * rows + tf.range(rows, dtype=index.dtype)
    out = {k: tf.repeat(tf.expand_dims(v, 0), rows, axis=0) for k, v in example.items()}
    out['prompt_ids'] = tf.repeat(tf.range(n, dtype=tf.int32), c)
    if candidates is not None:
      for k, v in cand.items():
        out[k] = tf.cast(v, example[k].dtype) if k in example else v
    return tf.data.Dataset.from_tensor_slices((ids, out))

  return ds.flat_map(expand)


def _group(indexed: Sequence[Tuple[int, Any]], rows: int) -> Dict[int, List[Any]]:
  out: Dict[int, List[Any]] = {}
  for index, value in sorted(indexed, key=lambda x: x[0]):
    out.setdefault(index // rows, []).append(value)
  return out


def _evaluator_base():
  import seqio  # pylint: disable=g-import-not-at-top

  return seqio.Evaluator


class EnsembleEvaluator(_evaluator_base()):  # pytype: disable=base-class-error
  """A `seqio.Evaluator` that evaluates the N prompts of a prompt-bank model in one pass.

  Bound as `evaluate.inference_evaluator_cls` by `configs/runs/ensemble_eval.gin`. The model
  functions it is given run on the dataset with every example replicated N times (`prompt_ids`
  0..N-1); the members' outputs are split apart and combined by `rule`. The task's metrics are
  computed for each member and for the ensemble; the loggers (TensorBoard, JSON) get the
  ensemble's, and the returned metrics hold the ensemble's under the task's metric names plus
  `member_<i>/<metric>`, `members_mean/<metric>` and `members_best/<metric>` (Table 3; also in
  `output_dir/ensemble.json`).
  """

  def __init__(
      self,
      *args: Any,
      prompts: Sequence[str] = (),
      rule: str = 'majority',
      class_labels: Optional[Sequence[str]] = None,
      output_dir: Optional[str] = None,
      **kwargs: Any,
  ):
    super().__init__(*args, **kwargs)
    if rule not in RULES:
      raise ValueError(f'ENSEMBLE_RULE must be one of {RULES}, got {rule!r}.')
    if rule == 'mean_score' and not class_labels:
      raise ValueError(
          "ENSEMBLE_RULE='mean_score' ranks the class labels: set CLASS_LABELS (e.g. "
          "--gin.CLASS_LABELS=\"['yes', 'no']\")."
      )
    self.prompts = list(prompts)
    self.num_prompts = ensemble_size(self.prompts)
    self.rule = rule
    self.class_labels = list(class_labels) if class_labels else None
    self.output_dir = output_dir
    self.tables: Dict[str, Any] = {}

  def _candidates(self, task) -> np.ndarray:
    return candidate_tokens(task.output_features['targets'].vocabulary, self.class_labels)

  def evaluate(
      self,
      *,
      compute_metrics: bool,
      step: Optional[int] = None,
      predict_fn=None,
      score_fn=None,
      predict_with_aux_fn=None,
      model_fns=None,
  ):
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top

    del predict_with_aux_fn, model_fns
    n = self.num_prompts
    tasks = {id(self._cached_model_datasets[t.name]): t for t in self.eval_tasks}
    predictions: Dict[Tuple[int, int], List[Any]] = {}  # (ds, member or -1) -> per example
    scores: Dict[Tuple[int, int], List[float]] = {}

    def run_predictions(ds):
      key = id(ds)
      if (key, -1) in predictions:
        return
      task = tasks[key]
      if self.rule == 'majority':
        grouped = _group(predict_fn(_expand_dataset(ds, n)), n)
        per_member = [[grouped[i][m] for i in sorted(grouped)] for m in range(n)]
        # The vote is over the predicted texts (distinct token sequences can spell one text).
        vocab = task.output_features['targets'].vocabulary
        voted = []
        for i in sorted(grouped):
          texts = [decode_prediction(vocab, t) for t in grouped[i]]
          winner = majority_vote([[(k,) for k in texts]])[0][0]
          voted.append(grouped[i][texts.index(winner)])
      else:
        cands = self._candidates(task)
        c = cands.shape[0]
        grouped = _group(score_fn(_expand_dataset(ds, n, cands)), n * c)
        table = np.asarray([grouped[i] for i in sorted(grouped)], np.float64).reshape(-1, n, c)
        padded = [list(row) for row in cands]
        per_member = [[padded[k] for k in np.argmax(table[:, m], axis=-1)] for m in range(n)]
        voted = [padded[k] for k in mean_score_vote(table)]
      for m in range(n):
        predictions[(key, m)] = per_member[m]
      predictions[(key, -1)] = voted

    def run_scores(ds):
      key = id(ds)
      if (key, -1) in scores:
        return
      grouped = _group(score_fn(_expand_dataset(ds, n)), n)
      table = np.asarray([grouped[i] for i in sorted(grouped)], np.float64)
      for m in range(n):
        scores[(key, m)] = [float(x) for x in table[:, m]]
      scores[(key, -1)] = [float(x) for x in table.mean(axis=1)]

    def fns(member):
      def predict(ds):
        run_predictions(ds)
        return list(enumerate(predictions[(id(ds), member)]))

      def score(ds):
        run_scores(ds)
        return list(enumerate(scores[(id(ds), member)]))

      return predict, score

    loggers = self._loggers
    member_metrics = []
    try:
      self._loggers = ()
      for m in range(n):
        predict, score = fns(m)
        metrics, _ = super().evaluate(
            compute_metrics=True, step=step, predict_fn=predict, score_fn=score
        )
        member_metrics.append(metrics.result() or {})
    finally:
      self._loggers = loggers
    predict, score = fns(-1)
    metrics, outputs = super().evaluate(
        compute_metrics=compute_metrics, step=step, predict_fn=predict, score_fn=score
    )
    if not compute_metrics:
      return metrics, outputs
    ensemble = metrics.result() or {}
    combined = {}
    for task_name, values in ensemble.items():
      members = [mm.get(task_name, {}) for mm in member_metrics]
      table = ensemble_table(members, values)
      self.tables[task_name] = table
      logging.info(
          'Prompt ensemble (%s):\n%s', self.rule, format_table(task_name, table, self.prompts)
      )
      row = dict(values)
      for metric, entry in table.items():
        for i, v in enumerate(entry['members']):
          row[f'member_{i}/{metric}'] = v
        row[f'members_mean/{metric}'] = entry['mean']
        row[f'members_best/{metric}'] = entry['best']
      combined[task_name] = row
    if self.output_dir:
      import jax  # pylint: disable=g-import-not-at-top

      if jax.process_index() == 0:
        fs.makedirs(self.output_dir)
        fs.write_text(
            fs.join(self.output_dir, 'ensemble.json'),
            json.dumps(
                {'prompts': self.prompts, 'rule': self.rule, 'step': step, 'tasks': self.tables},
                indent=1,
            ),
        )
    future = concurrent.futures.Future()
    future.set_result(combined)
    return future, outputs


# ----------------------------------------------------------------------------------------------
# Inference: a model that votes inside the compiled step.
# ----------------------------------------------------------------------------------------------


def majority_vote_jnp(tokens: Any) -> Any:
  """`[B, N, T]` token predictions -> `[B]` index of the winning member (most frequent sequence;
  ties to the lowest index), in jnp (for use inside jit)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  equal = jnp.all(tokens[:, :, None, :] == tokens[:, None, :, :], axis=-1)  # [B, N, N]
  counts = jnp.sum(equal, axis=-1)
  return jnp.argmax(counts, axis=-1)  # first maximum: the lowest index


@dataclasses.dataclass
class EnsembleModel:
  """A model wrapper that predicts with N prompts of a bank in one pass and votes (majority).

  `predict_batch_with_aux(params, batch)` replicates the batch N times with `prompt_ids`, runs the
  wrapped model's prediction once, and returns the majority prediction per example with aux
  `scores` (the winning member's) and `member_predictions` `[B, N, T]`. `score_batch` returns the
  members' mean log-likelihood. Everything else is the wrapped model's (so `prompt_tuning.infer`,
  and anything else that takes a model, works unchanged).
  """

  model: Any
  num_prompts: int

  def __getattr__(self, name: str) -> Any:
    if name in ('model', 'num_prompts'):
      raise AttributeError(name)
    return getattr(self.model, name)

  @property
  def FEATURE_CONVERTER_CLS(self):  # pylint: disable=invalid-name
    return self.model.FEATURE_CONVERTER_CLS

  def _replicate(self, batch):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    n = self.num_prompts
    size = batch['encoder_input_tokens'].shape[0]
    out = {k: jnp.repeat(v, n, axis=0) for k, v in batch.items() if k != 'prompt_ids'}
    out['prompt_ids'] = jnp.tile(jnp.arange(n, dtype=jnp.int32), size)
    return out, size

  def predict_batch_with_aux(self, params, batch, rng=None, **kwargs):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    expanded, size = self._replicate(batch)
    tokens, aux = self.model.predict_batch_with_aux(params, expanded, rng=rng, **kwargs)
    tokens = tokens.reshape((size, self.num_prompts) + tokens.shape[1:])
    if tokens.ndim != 3:
      raise ValueError('EnsembleModel votes over one decode per member (return_all_decodes=False).')
    winner = majority_vote_jnp(tokens)
    best = jnp.take_along_axis(tokens, winner[:, None, None], axis=1)[:, 0]
    member_scores = aux['scores'].reshape((size, self.num_prompts))
    out_aux = {
        'scores': jnp.take_along_axis(member_scores, winner[:, None], axis=1)[:, 0],
        'member_predictions': tokens,
        'member_scores': member_scores,
    }
    return best, out_aux

  def predict_batch(self, params, batch, rng=None):
    return self.predict_batch_with_aux(params, batch, rng=rng)[0]

  def score_batch(self, params, batch, return_intermediates: bool = False):
    expanded, size = self._replicate(batch)
    scores = self.model.score_batch(params, expanded, return_intermediates)
    return scores.reshape((size, self.num_prompts)).mean(axis=1)
