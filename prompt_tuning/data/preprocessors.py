"""seqio preprocessors: T5's GLUE/SuperGLUE/QA text-to-text formats and prompt-tuning variants.

Text preprocessors (run before tokenization, map over a `tf.data.Dataset`):

* `glue`: T5's generic format. `inputs` is the benchmark name followed by every
  text feature as `name: value`, features in sorted name order unless the task
  fixes an order (MultiRC: question, answer, paragraph; WiC: sentence1,
  sentence2, word); `targets` is the label's class name, `<unk>` for label -1
  (unlabelled test splits). E.g. `rte sentence1: ... sentence2: ...`,
  `boolq passage: ... question: ...`, `copa choice1: ... choice2: ...
  premise: ... question: ...`. MNLI (matched/mismatched) and GLUE's AX use the
  benchmark name `mnli`; SuperGLUE's AX-b/AX-g use `rte` (AX-b is first rekeyed
  sentence1/sentence2 -> premise/hypothesis). MultiRC drops `<br>`/`<b>` markup
  and keeps `idx/paragraph`, `idx/question`, `idx/answer`.
* `stsb`: `stsb sentence1: ... sentence2: ...`, target = score rounded to the
  nearest 0.2 with one decimal (`'3.8'`), `<unk>` for the unlabelled test split.
* `record`: `record query: ... entities: e1, e2 passage: ...`, one example per
  gold answer (target = that answer, `<unk>` when there is none); keeps
  `answers`, `idx/passage`, `idx/query` for evaluation.
* `wsc_simple`: T5's "simple" WSC: `wsc: <text with the pronoun as *it*>`,
  target = the candidate referent (span1); training keeps only examples whose
  referent is correct (`correct_referent_only=True`).
* `definite_pronoun_resolution_simple`: DPR in the same `wsc:` format.
* `squad` / `mrqa`: `question: ... context: ...` with punctuation padded by
  spaces (T5's `squad`), target = first answer; keeps `answers`, `context`,
  `question`.

Prompt-tuning variants:

* `remove_first_text_token`: the `taskless_*` tasks; removes exactly the first
  space-delimited word (the benchmark name), e.g. `sst2 sentence: x` ->
  `sentence: x`.
* `add_sentinel_to_beginning`: the `task_index_*` tasks; a token preprocessor
  that prepends one token id, `vocab_size - 1 - offset` (`<extra_id_{offset}>`
  for T5's vocabulary), naming the task for multi-task prompts.
"""

import functools
from typing import Callable, List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from prompt_tuning.data import utils

AUTOTUNE = tf.data.AUTOTUNE
UNK = utils.UNKNOWN_LABEL

# T5 fixes the order of these tasks' features; all others are sorted by name.
FEATURE_ORDER = {
    'multirc': ('question', 'answer', 'paragraph'),
    'wic': ('sentence1', 'sentence2', 'word'),
}
# AX-b ships sentence1/sentence2; T5 casts it as RTE (premise/hypothesis).
AXB_KEY_MAP = {'premise': 'sentence1', 'hypothesis': 'sentence2', 'label': 'label', 'idx': 'idx'}


# ========== helpers ==========
def pad_punctuation(text: tf.Tensor) -> tf.Tensor:
  """Adds spaces around every punctuation character and collapses whitespace."""
  text = tf.strings.regex_replace(text, r'([[:punct:]])', r' \1 ')
  return tf.strings.regex_replace(text, r'\s+', ' ')


def string_join(parts: Sequence) -> tf.Tensor:
  """Joins strings with single spaces, collapsing runs of whitespace."""
  joined = tf.strings.join(list(parts), separator=' ')
  return tf.strings.regex_replace(joined, r'\s+', ' ')


def label_name(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
  """Class name of an integer label; `<unk>` for negative labels (test splits)."""
  label = tf.cast(label, tf.int64)
  names = tf.constant(list(label_names), dtype=tf.string)
  return tf.where(label < 0, tf.constant(UNK), tf.gather(names, tf.maximum(label, 0)))


def glue_benchmark_name(config_name: str) -> str:
  """The word T5 puts in front of a (Super)GLUE config's inputs."""
  if 'mnli' in config_name or config_name == 'ax':
    return 'mnli'
  if config_name in ('axb', 'axg'):
    return 'rte'
  if config_name == 'wsc.fixed':
    return 'wsc'
  return config_name


# ========== text preprocessors ==========
@seqio.map_over_dataset
def glue(
    x: Mapping[str, tf.Tensor],
    benchmark_name: str,
    label_names: Sequence[str],
    feature_names: Optional[Sequence[str]] = None,
    id_key: Optional[str] = 'idx',
) -> Mapping[str, tf.Tensor]:
  """T5's GLUE/SuperGLUE text-to-text format (see the module docstring).

  Args:
    x: a TFDS example with text features, `label` and `idx`.
    benchmark_name: the first word of `inputs`.
    label_names: class names indexed by `label`.
    feature_names: ordered features to include; default: all but label/idx,
      sorted by name.
    id_key: the key of the example id that is copied to `idx` (None: none).

  Returns:
    {'inputs', 'targets', 'idx'} (MultiRC: idx/paragraph, idx/question,
    idx/answer instead of idx).
  """
  keys = feature_names or sorted(set(x.keys()).difference(['label', 'idx']))
  parts = [benchmark_name]
  for key in keys:
    parts.append(f'{key}:')
    parts.append(x[key])
  joined = tf.strings.join(parts, separator=' ')
  ex = {}
  if benchmark_name == 'multirc':
    joined = tf.strings.regex_replace(joined, '<br>', ' ')
    joined = tf.strings.regex_replace(joined, '<(/)?b>', '')
    ex['idx/paragraph'] = x['idx']['paragraph']
    ex['idx/question'] = x['idx']['question']
    ex['idx/answer'] = x['idx']['answer']
  elif id_key:
    ex['idx'] = x[id_key]
  ex['inputs'] = joined
  ex['targets'] = label_name(x['label'], label_names)
  return ex


@seqio.map_over_dataset
def stsb(x: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
  """STS-B: target is the similarity rounded to the nearest 0.2, e.g. '3.8'."""
  joined = tf.strings.join(
      ['stsb sentence1:', x['sentence1'], 'sentence2:', x['sentence2']], separator=' '
  )
  score = tf.cast(x['label'], tf.float32)
  rounded = tf.strings.as_string(tf.round(score * 5) / 5, precision=1)
  return {
      'inputs': joined,
      'targets': tf.where(score < 0, tf.constant(UNK), rounded),
      'idx': x['idx'],
  }


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """ReCoRD: one `record query: .. entities: .. passage: ..` example per answer."""

  def expand(x):
    passage = tf.strings.regex_replace(x['passage'], r'(\.|\?|\!|\"|\')\n@highlight\n', r'\1 ')
    passage = tf.strings.regex_replace(passage, r'\n@highlight\n', '. ')
    inputs = tf.strings.join(
        [
            'record query:',
            x['query'],
            'entities:',
            tf.strings.reduce_join(x['entities'], separator=', '),
            'passage:',
            passage,
        ],
        separator=' ',
    )
    answers = x['answers']
    targets = tf.cond(tf.size(answers) > 0, lambda: answers, lambda: tf.constant([UNK]))
    n = tf.shape(targets)[0]

    def dup(t):
      t = tf.convert_to_tensor(t)
      multiples = tf.concat([[n], tf.ones_like(tf.shape(t))], axis=0)
      return tf.tile(tf.expand_dims(t, 0), multiples)

    return {
        'inputs': dup(inputs),
        'targets': targets,
        'answers': dup(answers),
        'idx/passage': dup(x['idx']['passage']),
        'idx/query': dup(x['idx']['query']),
    }

  return dataset.map(expand, num_parallel_calls=AUTOTUNE).unbatch()


def mark_word(text: tf.Tensor, word: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Surrounds the word of `text` at (space-split) `index` with `*`.

  `*word*` replaces the word at `index` when it is `word` (or starts with it,
  e.g. `him,"` -> `*him* ,"`). Otherwise the occurrence of `word` closest to
  `index` is marked (a few WSC examples have an off-by-some index), then the
  word at `index`; if `index` is out of range the text is returned unchanged.
  """
  words = tf.strings.split(text, sep=' ')
  n = tf.size(words, out_type=tf.int32)
  index = tf.cast(index, tf.int32)
  in_range = tf.logical_and(index >= 0, index < n)
  safe = tf.clip_by_value(index, 0, tf.maximum(n - 1, 0))
  at = tf.gather(words, safe)
  word_len = tf.strings.length(word)
  at_ok = tf.logical_and(in_range, tf.equal(tf.strings.substr(at, 0, word_len), word))
  exact = tf.equal(words, word)
  distance = tf.where(exact, tf.abs(tf.range(n) - index), tf.fill([n], tf.int32.max))
  closest = tf.cast(tf.argmin(distance), tf.int32)
  chosen = tf.where(
      at_ok, index, tf.where(tf.reduce_any(exact), closest, tf.where(in_range, index, -1))
  )
  target = tf.gather(words, tf.maximum(chosen, 0))
  starts = tf.equal(tf.strings.substr(target, 0, word_len), word)
  target_len = tf.strings.length(target)
  rest_start = tf.minimum(word_len, target_len)
  rest = tf.strings.substr(target, rest_start, target_len - rest_start)
  marked_prefix = tf.strings.join(['*', word, '*'])
  marked = tf.where(
      starts,
      tf.where(
          tf.strings.length(rest) > 0,
          tf.strings.join([marked_prefix, rest], separator=' '),
          marked_prefix,
      ),
      tf.strings.join(['*', target, '*']),
  )
  updated = tf.tensor_scatter_nd_update(words, [[tf.maximum(chosen, 0)]], tf.expand_dims(marked, 0))
  return tf.where(chosen >= 0, tf.strings.reduce_join(updated, separator=' '), text)


def wsc_simple(
    dataset: tf.data.Dataset, label: str = 'wsc:', correct_referent_only: bool = False
) -> tf.data.Dataset:
  """T5's simple WSC: `wsc: Mitchell asked Tom if *he* could ...` -> `Tom`.

  Args:
    dataset: SuperGLUE `wsc.fixed` examples.
    label: the first word of `inputs`.
    correct_referent_only: keep only examples whose span1 is the referent
      (label 1); T5 trains on these only.

  Returns:
    Examples with `inputs`, `targets` (span1 text), `label` and `idx`.
  """
  if correct_referent_only:
    dataset = dataset.filter(lambda x: tf.cast(x['label'], tf.bool))

  def fn(x):
    marked = mark_word(x['text'], x['span2_text'], x['span2_index'])
    return {
        'inputs': tf.strings.join([label, marked], separator=' '),
        'targets': x['span1_text'],
        'label': x['label'],
        'idx': x['idx'],
    }

  return dataset.map(fn, num_parallel_calls=AUTOTUNE)


@seqio.map_over_dataset
def definite_pronoun_resolution_simple(
    x: Mapping[str, tf.Tensor], label: str = 'wsc:'
) -> Mapping[str, tf.Tensor]:
  """DPR in the simple WSC format: the first occurrence of the pronoun is starred."""
  pattern = tf.strings.join([r' (', x['pronoun'], r')( |\.|,)'])
  marked = tf.strings.regex_replace(x['sentence'], pattern, r' *\1*\2', replace_global=False)
  index = tf.cast(x['label'], tf.int64)
  target = tf.where(index < 0, tf.constant(UNK), tf.gather(x['candidates'], tf.maximum(index, 0)))
  return {
      'inputs': tf.strings.join([label, marked], separator=' '),
      'targets': target,
      'label': x['label'],
  }


def _first_or_empty(strings: tf.Tensor) -> tf.Tensor:
  return tf.cond(tf.size(strings) > 0, lambda: strings[0], lambda: tf.constant(''))


@seqio.map_over_dataset
def squad(x: Mapping[str, tf.Tensor], include_context: bool = True) -> Mapping[str, tf.Tensor]:
  """T5's SQuAD format: `question: <q> context: <c>` -> first answer."""
  answers = pad_punctuation(x['answers']['text'])
  question = pad_punctuation(x['question'])
  context = pad_punctuation(x['context'])
  if include_context:
    inputs = string_join(['question:', question, 'context:', context])
  else:
    inputs = string_join(['squad trivia question:', question])
  return {
      'inputs': inputs,
      'targets': _first_or_empty(answers),
      'id': x['id'],
      'context': context,
      'question': question,
      'answers': answers,
  }


@seqio.map_over_dataset
def mrqa(x: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
  """MRQA (TFDS `mrqa/*`) in SQuAD's format: `question: <q> context: <c>`."""
  question = pad_punctuation(x['question'])
  context = pad_punctuation(x['context'])
  answers = pad_punctuation(x['answers'])
  answer = _first_or_empty(answers)
  return {
      'idx': x['qid'],
      'question': question,
      'context': context,
      'answer': answer,
      'answers': answers,
      'inputs': string_join(['question:', question, 'context:', context]),
      'targets': answer,
  }


@seqio.map_over_dataset
def remove_first_text_token(x: Mapping[str, tf.Tensor], key: str = 'inputs'):
  """Removes the first space-delimited word of `x[key]` (and its space)."""
  x = dict(x)
  x[key] = tf.strings.regex_replace(x[key], r'^[^ ]* ', '', replace_global=False)
  return x


# ========== token preprocessors ==========
def task_index_token(vocabulary: seqio.Vocabulary, index: int) -> int:
  """Token id naming task `index`: `vocab_size - 1 - index` (`<extra_id_index>`)."""
  token = vocabulary.vocab_size - (index + 1)
  if token < 0:
    raise ValueError(f'Task index {index} does not fit a vocabulary of {vocabulary.vocab_size}.')
  return token


def add_sentinel_to_beginning(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    field: str = 'inputs',
    offset: int = 0,
) -> tf.data.Dataset:
  """Prepends the token `vocab_size - 1 - offset` to the tokenized `field`.

  Use after `seqio.preprocessors.tokenize` (and before EOS is appended).

  Args:
    dataset: tokenized examples.
    output_features: the task's features (seqio passes them by name).
    field: which feature gets the token.
    offset: the task index; the token is `<extra_id_{offset}>` for T5 vocabs.

  Returns:
    The dataset with one more leading token in `field`.
  """
  token = task_index_token(output_features[field].vocabulary, offset)

  def add(x):
    x = dict(x)
    value = x[field]
    x[field] = tf.concat([tf.constant([token], dtype=value.dtype), value], axis=0)
    return x

  return dataset.map(add, num_parallel_calls=AUTOTUNE)


def get_glue_text_preprocessor(
    config_name: str, label_classes: Optional[Sequence[str]] = None
) -> List[Callable[..., tf.data.Dataset]]:
  """T5's text preprocessor(s) for a GLUE or SuperGLUE TFDS config.

  Args:
    config_name: the TFDS builder config, e.g. 'sst2', 'mnli_matched', 'axb'.
    label_classes: the config's class names (unused for stsb and record).

  Returns:
    A list of dataset preprocessors (AX-b gets a rekey first).
  """
  if config_name == 'stsb':
    return [stsb]
  if config_name == 'record':
    return [record]
  if config_name.startswith('wsc'):
    raise ValueError('WSC uses `wsc_simple` (a referent generation task), not the GLUE format.')
  if label_classes is None:
    raise ValueError(f'{config_name!r} needs its label classes.')
  out = []
  if config_name == 'axb':
    out.append(functools.partial(seqio.preprocessors.rekey, key_map=AXB_KEY_MAP))
  out.append(
      functools.partial(
          glue,
          benchmark_name=glue_benchmark_name(config_name),
          label_names=tuple(label_classes),
          feature_names=FEATURE_ORDER.get(config_name),
      )
  )
  return out
