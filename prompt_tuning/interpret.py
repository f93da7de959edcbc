"""`python -m prompt_tuning.interpret PROMPT.npy --checkpoint CKPT`: read a soft prompt as words.

For every prompt vector, the vocabulary pieces whose input embeddings are nearest by cosine
similarity (the interpretability analysis of Lester et al. 2021, §7): a prompt initialized from
class labels or a task description, or one that stayed close to them, reads as related words.

    python -m prompt_tuning.interpret $MODEL_DIR/numpy_checkpoints/checkpoint_1000/encoder.prompt.prompt.prompt.npy \\
        --checkpoint gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_base/checkpoint_1100000 \\
        --vocabulary /path/to/cc_all.32000/sentencepiece.model --top_k 5 [--json neighbours.json]

`PROMPT.npy` is one `[P, H]` prompt or a bank `[N, P, H]` (`scripts/make_prompt_bank.py`). The
embedding is read alone from the checkpoint (`token_embedder/embedding`, or the decoder-only
`decoder/token_embedder/embedding`) through `checkpoints.formats.load_params`, so any checkpoint
format works and nothing else is loaded. Pieces are named by the SentencePiece model; ids past it
are T5's sentinels (`<extra_id_k>`, k counted down from the last of `--extra_ids`) and the unused
rows that pad the table to a multiple of 128 (`<unused_i>`).
"""

import json
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

EMBEDDING_PATHS = ('token_embedder/embedding', 'decoder/token_embedder/embedding')
DEFAULT_VOCABULARY = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'


def nearest_pieces(
    prompt: np.ndarray, embedding: np.ndarray, top_k: int = 5
) -> Tuple[np.ndarray, np.ndarray]:
  """The `top_k` rows of `embedding` nearest to each prompt vector by cosine similarity.

  Args:
    prompt: `[..., P, H]`.
    embedding: `[V, H]`.
    top_k: neighbours per vector.

  Returns:
    `(ids [..., P, k], similarities [..., P, k])`, most similar first (ties by lower id).
  """
  prompt = np.asarray(prompt, np.float64)
  embedding = np.asarray(embedding, np.float64)
  if prompt.shape[-1] != embedding.shape[-1]:
    raise ValueError(
        f'The prompt has width {prompt.shape[-1]} (shape {prompt.shape}) but the embedding '
        f'{embedding.shape[-1]} (shape {embedding.shape}): use the checkpoint of the model the '
        'prompt was trained for.'
    )
  top_k = min(int(top_k), embedding.shape[0])
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  sims = unit(prompt) @ unit(embedding).T  # [..., P, V]
  ids = np.argsort(-sims, axis=-1, kind='stable')[..., :top_k]
  return ids, np.take_along_axis(sims, ids, axis=-1)


def piece_names(vocab: Any, ids: Sequence[int], extra_ids: int = 100) -> List[str]:
  """Readable names of vocabulary ids (SentencePiece pieces, T5 sentinels, padding rows)."""
  tokenizer = getattr(vocab, 'tokenizer', None)
  size = tokenizer.get_piece_size() if tokenizer is not None else int(vocab.vocab_size)
  out = []
  for i in (int(i) for i in ids):
    if i < size:
      out.append(tokenizer.id_to_piece(i) if tokenizer is not None else vocab.decode([i]))
    elif i < size + extra_ids:
      out.append(f'<extra_id_{size + extra_ids - 1 - i}>')
    else:
      out.append(f'<unused_{i}>')
  return out


def load_embedding(checkpoint: str) -> np.ndarray:
  """The input embedding `[V, H]` of a checkpoint of any supported format."""
  from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top

  loaded = params_lib.flatten_params(
      formats.load_params(checkpoint, variables=list(EMBEDDING_PATHS), missing_ok=True)
  )
  for path in EMBEDDING_PATHS:
    if path in loaded:
      return np.asarray(loaded[path])
  raise KeyError(
      f'The checkpoint {checkpoint!r} has no input embedding ({" or ".join(EMBEDDING_PATHS)}).'
  )


def load_prompt(path: str) -> np.ndarray:
  from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

  if not fs.exists(path):
    raise FileNotFoundError(f'Prompt file {path!r} does not exist.')
  with fs.open(path, 'rb') as f:
    prompt = np.load(f, allow_pickle=False)
  if prompt.ndim not in (2, 3):
    raise ValueError(
        f'{path} has shape {prompt.shape}: expected one prompt [P, H] or a bank [N, P, H].'
    )
  return prompt


def interpret(
    prompt: np.ndarray, embedding: np.ndarray, vocab: Any, top_k: int = 5, extra_ids: int = 100
) -> List[List[List[Dict[str, Any]]]]:
  """`[prompt][position][neighbour] -> {'id', 'piece', 'cosine'}` (a single prompt is a bank of 1)."""
  bank = prompt[None] if prompt.ndim == 2 else prompt
  ids, sims = nearest_pieces(bank, embedding, top_k)
  out = []
  for b in range(bank.shape[0]):
    rows = []
    for p in range(bank.shape[1]):
      names = piece_names(vocab, ids[b, p], extra_ids)
      rows.append(
          [
              {'id': int(i), 'piece': n, 'cosine': float(s)}
              for i, n, s in zip(ids[b, p], names, sims[b, p])
          ]
      )
    out.append(rows)
  return out


def format_table(result: List[List[List[Dict[str, Any]]]]) -> str:
  lines = []
  for b, rows in enumerate(result):
    if len(result) > 1:
      lines.append(f'prompt {b}:')
    for p, neighbours in enumerate(rows):
      cells = '  '.join(f'{n["piece"]} ({n["cosine"]:.3f})' for n in neighbours)
      lines.append(f'{p:4d}  {cells}')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog='python -m prompt_tuning.interpret',
      description='Nearest vocabulary pieces (cosine) of each soft prompt vector.',
  )
  parser.add_argument('prompt', help='a [P, H] prompt or [N, P, H] bank (.npy)')
  parser.add_argument('--checkpoint', required=True, help='the frozen model (any format)')
  parser.add_argument('--vocabulary', default=DEFAULT_VOCABULARY, help='SentencePiece model')
  parser.add_argument('--extra_ids', type=int, default=100, help="T5's sentinel count")
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--json', default=None, help='also write the neighbours as JSON here')
  args = parser.parse_args(argv)
  try:
    import seqio  # pylint: disable=g-import-not-at-top
    from prompt_tuning import fs  # pylint: disable=g-import-not-at-top

    prompt = load_prompt(args.prompt)
    embedding = load_embedding(args.checkpoint)
    vocab = seqio.SentencePieceVocabulary(args.vocabulary)
    result = interpret(prompt, embedding, vocab, args.top_k, args.extra_ids)
  except (ValueError, KeyError, FileNotFoundError, OSError) as e:
    print(f'ERROR: {e}', file=sys.stderr)
    return 1
  print(format_table(result))
  if args.json:
    fs.write_text(args.json, json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()
  sys.exit(main())
