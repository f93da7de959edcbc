#!/usr/bin/env python3
"""Builds the toy SentencePiece model `tasks/toy_data/toy_spm.model` from `tasks.toy`'s text.

Usage: .venv/bin/python scripts/build_toy_vocab.py [--output PATH] [--vocab_size N] [--check_only]

The model is a 300-piece BPE SentencePiece model with T5's special ids (pad=0, eos=1, unk=2, no
bos), trained on the pretraining corpus (both splits) and on every word of the toy world (task
prefixes and label words included), plus one line of all printable ASCII characters so that other
English text still encodes without unknowns.
seqio adds the 100 sentinels when it loads the model (`toy.get_toy_vocabulary()`). The script
checks that every word of the toy world (so every label word) is a single piece; training is
single-threaded and deterministic, so rerunning the script reproduces the committed file.

Rebuild it (and retrain any toy backbone) whenever the toy world's word lists or scene template
change; changes to how tasks sample their examples do not affect it.
"""

import argparse
import io
import os
import string
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import sentencepiece as spm  # pylint: disable=g-import-not-at-top
from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top


def training_lines():
  """The text the model is trained on, in a fixed order.

  Only the pretraining corpus and the world's word lists are used (not the tasks' examples), so
  that changing how a task samples its examples does not change the vocabulary.
  """
  from tasks import toy  # pylint: disable=g-import-not-at-top

  lines = []
  for split in toy.SPLITS:
    lines.extend(toy.corpus_documents(split))
  # Every word (task prefixes, label words, ...) often enough to become a piece of its own.
  for word in toy.world_words():
    lines.extend([f'{word}: {word}? {word}'] * 200)
  # Character coverage for text outside the toy world.
  lines.append(' '.join(string.ascii_lowercase + string.digits + string.punctuation))
  lines.append(' '.join(string.ascii_uppercase))
  return lines


def world_words():
  from tasks import toy  # pylint: disable=g-import-not-at-top

  return toy.world_words()


# Normalization rules (hex code points -> hex code points): tab, no-break space and ideographic
# space become a plain space.
_NORMALIZATION_RULES = '9\t20\nA0\t20\n3000\t20\n'


def build(vocab_size: int) -> bytes:
  model = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    rules_path = os.path.join(tmp, 'rules.tsv')
    with open(rules_path, 'w') as f:
      f.write(_NORMALIZATION_RULES)
    _train(model, vocab_size, rules_path)
  # The trainer records the (temporary) rules path in the model; drop it so that the file does not
  # depend on where it was built.
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model.getvalue())
  proto.normalizer_spec.ClearField('normalization_rule_tsv')
  return proto.SerializeToString(deterministic=True)


def _train(model, vocab_size: int, rules_path: str) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(training_lines()),
      model_writer=model,
      # BPE: on this small, repetitive corpus unigram pruning keeps splitting words
      # ('fox' 'e' 's'), while BPE merges every frequent word into one piece.
      model_type='bpe',
      vocab_size=vocab_size,
      character_coverage=1.0,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      pad_piece='<pad>',
      eos_piece='</s>',
      unk_piece='<unk>',
      num_threads=1,
      shuffle_input_sentence=False,
      input_sentence_size=0,
      split_digits=True,
      # A three-rule normalizer instead of NFKC keeps the model file a few KB (and, unlike
      # 'identity', does not make every tokenizer load log that its charsmap is empty).
      normalization_rule_tsv=rules_path,
      minloglevel=2,
  )


def check(model_bytes: bytes) -> None:
  sp = spm.SentencePieceProcessor(model_proto=model_bytes)
  bad = [w for w in world_words() if len(sp.EncodeAsIds(w)) != 1]
  if bad:
    raise SystemExit(f'These words are not single pieces: {bad}; raise --vocab_size.')
  print(f'{sp.GetPieceSize()} pieces; all {len(world_words())} world words are single pieces.')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--output', default=os.path.join(os.path.dirname(HERE), 'tasks', 'toy_data', 'toy_spm.model')
  )
  parser.add_argument('--vocab_size', type=int, default=300)
  parser.add_argument(
      '--check_only',
      action='store_true',
      help='check the existing model instead of writing a new one',
  )
  args = parser.parse_args()
  if args.check_only:
    with open(args.output, 'rb') as f:
      check(f.read())
    return
  model_bytes = build(args.vocab_size)
  check(model_bytes)
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  tmp = args.output + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(model_bytes)
  os.replace(tmp, args.output)
  print(f'wrote {args.output} ({len(model_bytes)} bytes)')


if __name__ == '__main__':
  main()
