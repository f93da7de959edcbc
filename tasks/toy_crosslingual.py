"""A second toy language and the offline cross-lingual toy suite (factorized-prompt demo).

Language A is the world of `tasks/toy.py` as it is. Language B is a consistent re-lexicalisation
of it, generated here (not copied from anywhere): every word of the toy world is replaced by a
two-letter upper-case word drawn once and for all with a seeded RNG (`lexicon()`), e.g.
"two small red foxes sleep near the river" becomes something like "KQ BX AD FM LT DW IA HE". The
words are written with pieces the bundled toy vocabulary already has (`▁A`..`▁M` then one upper-case
letter: exactly two pieces per word, none of them used by language A), so both languages share
`toy.get_toy_vocabulary()` and no new vocabulary is needed. Word order and grammar are A's.

Tasks (`toy_xl_<task>_<lang>`, lang `a` or `b`; every example carries int32 `lang_ids` (A 0,
B 1) and `task_ids`; inputs and targets are in the example's language):
  corpus      span corruption of one-scene documents (unlabeled text; task_ids 1).
  toy_xl_corpus_mixed   the same span corruption on code-switched documents: each word written in
              A or B at random (`code_switch`, rate 0.5): a cross-lingual signal (the default
              backbone mixture has none: nothing in it says which B word means which A word);
              only in the anchored backbone mixture.
  colour      "colour: <scene>" -> the colour word (task_ids 2).
  animal      "animal: <scene>" -> the animal word, singular (task_ids 3).
  question    "<value>? <scene>" -> yes / no: is the scene's colour, animal or size that value
              (balanced; task_ids 4).
  indoor      the bare scene -> yes / no, is the place indoors (held out: in no backbone
              mixture; task_ids 0, the task prompt's row).
  toy_xl_describe_b   "describe: <scene>" in B -> "<size> <colour> <animal> <place>" in A (the
              toy's describe task across the languages: parallel data, the second cross-lingual
              signal, the only one that says which B place word is which A place; task_ids 5;
              only in the anchored backbone mixture).
  toy_xl_indoor_b_with_a_prompt   toy_xl_indoor_b's examples with `lang_ids` 0: language B
              inputs served with language A's prompt (the zero-shot baseline that does not swap).

Mixtures: `toy_xl_backbone_mixture` (the corpora of A and B at rate 2 and colour/animal/question
in both languages: what the demo backbone is pre-trained on; the two languages share no word and no
example), `toy_xl_anchored_backbone_mixture` (the same plus the code-switched corpus at rate 2 and
describe B -> A: the demo's XL_ANCHORED=1 variant), `toy_xl_language_mixture` (the two corpora:
stage (a), language prompts), `toy_xl_indoor_eval` (indoor A, indoor B, indoor B with A's prompt).

Metrics of the indoor tasks (`label_metrics`): `accuracy` (the exact label of the example's
language), `any_language_accuracy` (the right answer in either language), `target_language`
(percent of answers that are a label word of the example's language).

`TASK_FEATURE_LENGTHS` = {'inputs': 20, 'targets': 6} fits every example, EOS included.
"""

import functools
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from tasks import toy

LANGS = ('a', 'b')
MIXED = 'mixed'  # the code-switched corpus of the backbone (words of A and B in one document)
CODE_SWITCH_RATE = 0.5  # probability that a word of a code-switched document is written in B
FIRST_LETTERS = 'ABCDEFGHIJKLM'  # the toy vocabulary has the pieces '▁A' .. '▁M'
SECOND_LETTERS = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
TRAIN_SIZE = 20000
VALIDATION_SIZE = 500
TASK_FEATURE_LENGTHS = {'inputs': 20, 'targets': 6}
TASK_IDS = {'indoor': 0, 'corpus': 1, 'colour': 2, 'animal': 3, 'question': 4, 'describe': 5}
MONOLINGUAL_TASKS = ('indoor', 'corpus', 'colour', 'animal', 'question')  # in A and in B
HELDOUT = 'indoor'
LANGUAGE_MIXTURE = 'toy_xl_language_mixture'
BACKBONE_MIXTURE = 'toy_xl_backbone_mixture'
ANCHORED_BACKBONE_MIXTURE = 'toy_xl_anchored_backbone_mixture'
EVAL_MIXTURE = 'toy_xl_indoor_eval'
A_PROMPT_TASK = 'toy_xl_indoor_b_with_a_prompt'


@functools.lru_cache(maxsize=None)
def lexicon() -> Dict[str, str]:
  """Language A word -> language B word, for every word of the toy world (fixed, seeded)."""
  words = toy.world_words()
  combos = [f + s for f in FIRST_LETTERS for s in SECOND_LETTERS]
  rng = np.random.default_rng(toy._stable_seed('crosslingual', 'lexicon'))  # pylint: disable=protected-access
  chosen = rng.choice(len(combos), size=len(words), replace=False)
  return {w: combos[int(i)] for w, i in zip(words, chosen)}


def translate(text: str, lang: str) -> str:
  """`text` of language A in `lang` ('a': as it is; 'b': word by word, punctuation kept)."""
  if lang == 'a':
    return text
  table = lexicon()
  out = []
  for token in text.split(' '):
    word, tail = token, ''
    while word and word[-1] in ':?':
      word, tail = word[:-1], word[-1] + tail
    out.append(table[word] + tail)
  return ' '.join(out)


def code_switch(text: str, rng: np.random.Generator, rate: float = CODE_SWITCH_RATE) -> str:
  """`text` of language A with each word independently written in B with probability `rate`."""
  table = lexicon()
  out = []
  for token in text.split(' '):
    word, tail = token, ''
    while word and word[-1] in ':?':
      word, tail = word[:-1], word[-1] + tail
    out.append((table[word] if rng.random() < rate else word) + tail)
  return ' '.join(out)


def task_name(task: str, lang: str) -> str:
  return f'toy_xl_{task}_{lang}'


def _size(split: str) -> int:
  return TRAIN_SIZE if split == 'train' else VALIDATION_SIZE


def _scenes(task: str, lang: str, split: str) -> List[toy.Scene]:
  return toy.sample_scenes(f'xl_{task}_{lang}', split, _size(split))


def _question(scene: toy.Scene, rng: np.random.Generator) -> Tuple[str, str]:
  values, index = (
      (toy.COLOURS, scene.colour),
      (toy.ANIMAL_WORDS, scene.animal),
      (toy.SIZES, scene.size),
  )[int(rng.integers(3))]
  if rng.integers(2):
    return values[index], 'yes'
  others = [v for i, v in enumerate(values) if i != index]
  return others[int(rng.integers(len(others)))], 'no'


@functools.lru_cache(maxsize=None)
def generate_examples(task: str, lang: str, split: str) -> Tuple[Dict, ...]:
  """All examples of `toy_xl_<task>_<lang>` in `split` (deterministic; cached)."""
  scenes = _scenes(task, lang, split)
  # The code-switched corpus belongs to neither language; it is only in a backbone mixture (model
  # tuning does not read lang_ids).
  ids = {'lang_ids': 0 if lang == MIXED else LANGS.index(lang), 'task_ids': TASK_IDS[task]}
  out = []
  if task == 'corpus':
    vocab = toy.get_toy_vocabulary()
    rng = np.random.default_rng(toy._stable_seed('xl_corpus', lang, split, 'noise'))  # pylint: disable=protected-access
    switch_rng = np.random.default_rng(toy._stable_seed('xl_corpus', lang, split, 'switch'))  # pylint: disable=protected-access
    for s in scenes:
      text = code_switch(s.text(), switch_rng) if lang == MIXED else translate(s.text(), lang)
      tokens = vocab.tokenizer.EncodeAsIds(text)
      mask = toy.random_spans_noise_mask(len(tokens), rng)
      inputs, targets = toy.span_corrupt(tokens, mask, lambda k: toy.sentinel_id(vocab, k))
      out.append(
          {
              'inputs': np.asarray(inputs, np.int32),
              'targets': np.asarray(targets, np.int32),
              'inputs_pretokenized': vocab.tokenizer.DecodeIds(inputs),
              'targets_pretokenized': vocab.tokenizer.DecodeIds(targets),
              **ids,
          }
      )
    return tuple(out)
  rng = np.random.default_rng(toy._stable_seed('xl', task, lang, split))  # pylint: disable=protected-access
  for s in scenes:
    if task == 'colour':
      inputs, target = f'colour: {s.text()}', toy.COLOURS[s.colour]
    elif task == 'animal':
      inputs, target = f'animal: {s.text()}', toy.ANIMAL_WORDS[s.animal]
    elif task == 'question':
      value, target = _question(s, rng)
      inputs = f'{value}? {s.text()}'
    elif task == 'indoor':
      inputs, target = s.text(), 'yes' if s.indoor else 'no'
    elif task == 'describe' and lang == 'b':
      # Cross-lingual: inputs in B, the description in A (the words are the dictionary's anchor).
      words = (toy.SIZES[s.size], toy.COLOURS[s.colour], toy.ANIMALS[s.animal][0])
      words += (toy.PLACES[s.place],)
      out.append(
          {'inputs': translate(f'describe: {s.text()}', 'b'), 'targets': ' '.join(words), **ids}
      )
      continue
    else:
      raise ValueError(f'Unknown cross-lingual toy task {task!r}.')
    out.append({'inputs': translate(inputs, lang), 'targets': translate(target, lang), **ids})
  return tuple(out)


# ----------------------------------------------------------------------------------- metrics --


def label_metrics(lang: str) -> Callable[[Sequence[str], Sequence[str]], Dict[str, float]]:
  """Metrics of a yes/no task whose targets are in `lang` (see the module docstring)."""
  labels = {translate(w, lang) for w in toy.YES_NO}
  meaning = {translate(w, l): w for w in toy.YES_NO for l in LANGS}

  def metrics(targets: Sequence, predictions: Sequence) -> Dict[str, float]:
    targets = [toy._to_str(t) for t in targets]  # pylint: disable=protected-access
    predictions = [toy._to_str(p) for p in predictions]  # pylint: disable=protected-access
    n = max(len(targets), 1)
    exact = sum(t == p for t, p in zip(targets, predictions))
    either = sum(meaning.get(p) == meaning[t] for t, p in zip(targets, predictions))
    in_lang = sum(p in labels for p in predictions)
    return {
        'accuracy': 100.0 * exact / n,
        'any_language_accuracy': 100.0 * either / n,
        'target_language': 100.0 * in_lang / n,
    }

  metrics.__name__ = f'label_metrics_{lang}'
  return metrics


# ------------------------------------------------------------------------------ registration --


def get_output_features() -> Dict[str, seqio.Feature]:
  """Text features plus `lang_ids` / `task_ids`: one int per example, stored as a `[1]` vector
  (a seqio Mixture keeps only output features, and seqio's evaluator measures the length of each);
  the feature converters hand them to the model as `[B]` (`conditioning_features`)."""
  features = toy.get_output_features()
  for name, size in (('lang_ids', len(LANGS)), ('task_ids', len(TASK_IDS))):
    features[name] = seqio.Feature(
        vocabulary=seqio.PassThroughVocabulary(size=size),
        add_eos=False,
        required=False,
        dtype=tf.int32,
        rank=1,
    )
  return features


def _dataset_fn(task: str, lang: str, lang_ids: Optional[int] = None):
  def dataset_fn(split: str, shuffle_files: bool = False, seed: Optional[int] = None):
    del shuffle_files, seed
    examples = generate_examples(task, lang, split)
    data = {}
    for k in examples[0]:
      values = [ex[k] for ex in examples]
      if task == 'corpus' and k in ('inputs', 'targets'):
        data[k] = tf.RaggedTensor.from_row_lengths(
            np.concatenate(values).astype(np.int32), np.asarray([len(v) for v in values], np.int64)
        )
      else:
        data[k] = np.asarray(values)
    for k in ('lang_ids', 'task_ids'):
      data[k] = data[k].astype(np.int32).reshape(-1, 1)
    if lang_ids is not None:
      data['lang_ids'] = np.full_like(data['lang_ids'], lang_ids)
    return tf.data.Dataset.from_tensor_slices(data)

  return dataset_fn


def _add(name: str, task: str, lang: str, lang_ids: Optional[int] = None) -> None:
  if name in seqio.TaskRegistry.names():
    return
  if task == 'corpus':
    preprocessors = [seqio.preprocessors.append_eos_after_trim]
    postprocess_fn, metric_fns = None, []
  else:
    preprocessors = [toy.tokenize_text, seqio.preprocessors.append_eos_after_trim]
    postprocess_fn = toy.strip_postprocessor
    metric_fns = [label_metrics(lang)] if task == HELDOUT else [toy.accuracy]
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          _dataset_fn(task, lang, lang_ids),
          splits=toy.SPLITS,
          num_input_examples={'train': TRAIN_SIZE, 'validation': VALIDATION_SIZE},
      ),
      preprocessors=preprocessors,
      output_features=get_output_features(),
      postprocess_fn=postprocess_fn,
      metric_fns=metric_fns,
  )


def register() -> None:
  """Registers every task and mixture of the suite (idempotent; called on import)."""
  for task in MONOLINGUAL_TASKS:
    for lang in LANGS:
      _add(task_name(task, lang), task, lang)
  _add(task_name('corpus', MIXED), 'corpus', MIXED)
  _add(task_name('describe', 'b'), 'describe', 'b')
  _add(A_PROMPT_TASK, HELDOUT, 'b', lang_ids=0)
  backbone = [
      (task_name(t, l), 2.0 if t == 'corpus' else 1.0)
      for t in ('corpus', 'colour', 'animal', 'question')
      for l in LANGS
  ]
  mixtures = {
      BACKBONE_MIXTURE: backbone,
      ANCHORED_BACKBONE_MIXTURE: backbone
      + [(task_name('corpus', MIXED), 2.0), (task_name('describe', 'b'), 1.0)],
      LANGUAGE_MIXTURE: [(task_name('corpus', l), 1.0) for l in LANGS],
      EVAL_MIXTURE: [
          (task_name(HELDOUT, 'a'), 1.0),
          (task_name(HELDOUT, 'b'), 1.0),
          (A_PROMPT_TASK, 1.0),
      ],
  }
  for name, tasks in mixtures.items():
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, tasks)


register()
