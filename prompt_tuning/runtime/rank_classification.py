"""Rank classification: scoring a fixed set of candidate targets instead of decoding.

Every example is paired with every candidate target (`build_rank_classification_batch`), a
`score_fn` (e.g. `EncoderDecoderModel.score_batch`) gives each pair's log-likelihood, and the
best-scoring candidate is the prediction (`rank_classification`). `pad_candidates` turns ragged
candidate token lists into the `[C, T]` array the batch is built from.
"""

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Array = Any  # np.ndarray or jax.Array


def pad_candidates(
    candidates: Union[Array, Sequence[Sequence[int]]],
    length: Optional[int] = None,
    eos_id: Optional[int] = None,
) -> np.ndarray:
  """Stacks candidate target token sequences into a `[C, T]` int32 array.

  Args:
    candidates: a `[C, T]` array or a list of token id lists (ragged ok).
    length: output length `T` (defaults to the longest candidate); longer
      candidates raise.
    eos_id: if given, appended to every candidate not already ending with it.

  Returns:
    `[C, T]` int32 numpy array, padded with 0.
  """
  seqs = []
  for cand in candidates:
    toks = [int(t) for t in np.asarray(cand).reshape(-1)]
    while toks and toks[-1] == 0:
      toks.pop()
    if eos_id is not None and (not toks or toks[-1] != eos_id):
      toks.append(int(eos_id))
    seqs.append(toks)
  if not seqs:
    raise ValueError('candidates is empty.')
  longest = max(len(s) for s in seqs)
  if length is None:
    length = longest
  if longest > length:
    raise ValueError(f'A candidate has {longest} tokens, more than the ' f'target length {length}.')
  out = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    out[i, : len(s)] = s
  return out


def build_rank_classification_batch(
    batch: Mapping[str, Array],
    label_token_ids: Union[Array, Sequence[Sequence[int]]],
) -> dict:
  """Pairs every example with every candidate target: `B * C` rows.

  Row `b * C + c` holds example `b` with candidate `c`. Features not starting
  with `decoder_` (e.g. `encoder_input_tokens`, `encoder_segment_ids`) whose
  leading axis is the batch are repeated; the decoder features are rebuilt:
  `decoder_target_tokens` is the candidate, `decoder_input_tokens` its
  shift-right with BOS 0, `decoder_loss_weights` is `target > 0`.

  Args:
    batch: features of `B` examples, at least `encoder_input_tokens [B, L]`.
    label_token_ids: `C` candidate target sequences (`[C, T]`, 0-padded,
      normally EOS-terminated), or a ragged list padded via `pad_candidates`.

  Returns:
    The expanded batch (numpy arrays).
  """
  if 'encoder_input_tokens' not in batch:
    raise KeyError('batch needs an "encoder_input_tokens" feature.')
  cands = pad_candidates(label_token_ids)
  num_cands, _ = cands.shape
  batch_size = np.shape(batch['encoder_input_tokens'])[0]
  out = {}
  for key, value in batch.items():
    if key.startswith('decoder_'):
      continue
    value = np.asarray(value)
    if value.ndim >= 1 and value.shape[0] == batch_size:
      out[key] = np.repeat(value, num_cands, axis=0)
    else:
      out[key] = value
  targets = np.tile(cands, (batch_size, 1))
  decoder_inputs = np.zeros_like(targets)
  decoder_inputs[:, 1:] = targets[:, :-1]
  out['decoder_target_tokens'] = targets
  out['decoder_input_tokens'] = decoder_inputs
  out['decoder_loss_weights'] = (targets > 0).astype(np.int32)
  return out


def rank_classification(
    score_fn: Callable[[Mapping[str, np.ndarray]], Array],
    batch: Mapping[str, Array],
    label_token_ids: Union[Array, Sequence[Sequence[int]]],
    normalize_by_length: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
  """Scores every candidate label for every example and picks the best.

  Args:
    score_fn: expanded batch -> `[B * C]` per-sequence log-likelihoods (e.g.
      `lambda b: model.score_batch(params, b)`).
    batch: features of `B` examples (see `build_rank_classification_batch`).
    label_token_ids: `C` candidate target sequences.
    normalize_by_length: divide each score by its candidate's token count.

  Returns:
    `(best [B] int32 candidate index, scores [B, C] float32)`; ties go to the
    lowest index.
  """
  expanded = build_rank_classification_batch(batch, label_token_ids)
  batch_size = np.shape(batch['encoder_input_tokens'])[0]
  num_cands = expanded['decoder_target_tokens'].shape[0] // batch_size
  scores = np.asarray(score_fn(expanded), np.float32)
  if scores.size != batch_size * num_cands:
    raise ValueError(
        f'score_fn returned {scores.shape}, expected ' f'[{batch_size * num_cands}] scores.'
    )
  scores = scores.reshape((batch_size, num_cands))
  if normalize_by_length:
    lengths = expanded['decoder_loss_weights'].sum(axis=1).reshape((batch_size, num_cands))
    scores = (scores / np.maximum(lengths, 1)).astype(np.float32)
  best = np.argmax(scores, axis=1).astype(np.int32)
  return best, scores
