"""`python -m prompt_tuning.interpret`: nearest vocabulary pieces of prompt vectors by cosine.

The oracle is a float64 numpy cosine over the whole embedding table of a tiny T5X checkpoint
(read back through `formats.load_params`); prompt vectors are scaled, noisy copies of chosen rows,
so their nearest pieces are known. Pieces are named by seqio's test SentencePiece model; ids past
it are T5's sentinels and padding rows.
"""

import json
import os

import numpy as np
import pytest

from prompt_tuning import interpret

seqio = pytest.importorskip('seqio')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'runtime'))
  import runtime_testlib as rt  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.mktemp('interpret')
  ckpt = rt.make_t5x_checkpoint(str(root))
  vocab_path = rt.vocab_path()
  embedding = interpret.load_embedding(ckpt)
  return ckpt, vocab_path, embedding, root


def test_nearest_pieces_and_cosines_equal_numpy(setup, capsys):
  ckpt, vocab_path, embedding, root = setup
  vocab = seqio.SentencePieceVocabulary(vocab_path)
  size = vocab.tokenizer.get_piece_size()
  assert embedding.shape == (128, 32)
  chosen = [3, 5, size + 99, size + 100]  # two pieces, <extra_id_0>, a padding row
  rng = np.random.RandomState(0)
  prompt = np.stack([2.5 * embedding[i] + 0.05 * rng.normal(size=32) for i in chosen])
  path = str(root / 'prompt.npy')
  np.save(path, prompt.astype(np.float32))
  out = str(root / 'neighbours.json')
  assert (
      interpret.main(
          [path, '--checkpoint', ckpt, '--vocabulary', vocab_path, '--top_k', '3', '--json', out]
      )
      == 0
  )
  printed = capsys.readouterr().out
  with open(out) as f:
    result = json.load(f)
  e = embedding.astype(np.float64)
  p = prompt.astype(np.float32).astype(np.float64)
  cos = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (
      e / np.linalg.norm(e, axis=1, keepdims=True)
  ).T
  assert len(result) == 1 and len(result[0]) == len(chosen)
  for row, i, c in zip(result[0], chosen, cos):
    assert [n['id'] for n in row] == list(np.argsort(-c, kind='stable')[:3])
    assert row[0]['id'] == i
    np.testing.assert_allclose([n['cosine'] for n in row], np.sort(c)[::-1][:3], rtol=1e-9)
  names = [row[0]['piece'] for row in result[0]]
  assert names[:2] == [vocab.tokenizer.id_to_piece(3), vocab.tokenizer.id_to_piece(5)]
  assert names[2:] == ['<extra_id_0>', f'<unused_{size + 100}>']
  assert names[0] in printed and '<extra_id_0>' in printed


def test_a_bank_and_a_width_mismatch(setup, capsys):
  ckpt, vocab_path, embedding, root = setup
  bank = np.stack([embedding[[7, 8]], embedding[[9, 10]]])
  path = str(root / 'bank.npy')
  np.save(path, bank)
  assert (
      interpret.main([path, '--checkpoint', ckpt, '--vocabulary', vocab_path, '--top_k', '1']) == 0
  )
  printed = capsys.readouterr().out
  assert 'prompt 0:' in printed and 'prompt 1:' in printed
  ids, _ = interpret.nearest_pieces(bank, embedding, 1)
  np.testing.assert_array_equal(ids[..., 0], [[7, 8], [9, 10]])
  wide = str(root / 'wide.npy')
  np.save(wide, np.zeros((2, 48), np.float32))
  assert interpret.main([wide, '--checkpoint', ckpt, '--vocabulary', vocab_path]) == 1
  assert 'width 48' in capsys.readouterr().err
