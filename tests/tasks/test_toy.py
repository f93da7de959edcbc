"""Tests of the offline toy task suite (`tasks/toy.py`) and its bundled vocabulary."""

import collections
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import seqio

from tasks import toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCENE_RE = (
    r'(?P<number>\w+) (?P<size>\w+) (?P<colour>\w+) (?P<animal>\w+) (?P<verb>\w+) '
    r'(?P<prep>\w+) the (?P<place>\w+)'
)
SCENE_TASKS = (
    'toy_colour',
    'toy_animal',
    'toy_size',
    'toy_question',
    'toy_describe',
    'toy_heldout_indoor',
    'toy_heldout_place',
    'toy_heldout_number',
    'toy_taskless_colour',
    'toy_taskless_animal',
    'toy_taskless_size',
    'toy_taskless_indoor',
)
LIST_TASKS = ('toy_count', 'toy_copy_reverse')
ALL_TASKS = (toy.SPAN_CORRUPTION_TASK,) + tuple(toy._GENERATORS)  # pylint: disable=protected-access
ALL_MIXTURES = (toy.BACKBONE_MIXTURE, toy.MULTITASK_MIXTURE, toy.MIXED_TASK_MIXTURE)


@pytest.fixture(scope='module')
def vocab():
  return toy.get_toy_vocabulary()


def _parse_scene(text):
  m = re.fullmatch(SCENE_RE, text)
  assert m, text
  d = m.groupdict()
  singular = {p: s for s, p in toy.ANIMALS}
  singular.update({s: s for s, _ in toy.ANIMALS})
  assert d['number'] in toy.NUMBERS and d['size'] in toy.SIZES and d['colour'] in toy.COLOURS
  assert d['place'] in toy.PLACES and d['prep'] in toy.PREPOSITIONS
  plural = d['number'] != 'one'
  assert d['animal'] in [a[int(plural)] for a in toy.ANIMALS], text
  assert d['verb'] in [v[int(plural)] for v in toy.VERBS], text
  d['animal'] = singular[d['animal']]
  return d


def _scenes_of(example_text):
  """The scenes inside an input text (strips a task prefix or a question)."""
  text = example_text.split(': ', 1)[-1].split('? ', 1)[-1]
  return text.split(' and ')


# ------------------------------------------------------------------------------------------------
# Determinism and splits.
# ------------------------------------------------------------------------------------------------


def test_generation_is_deterministic():
  for name in SCENE_TASKS + LIST_TASKS:
    generator = toy._GENERATORS[name][0]  # pylint: disable=protected-access
    assert generator(name, 'validation') == generator(name, 'validation'), name
  generate = toy._span_corruption_examples  # pylint: disable=protected-access
  first = generate(toy.SPAN_CORRUPTION_TASK, 'validation')
  second = generate(toy.SPAN_CORRUPTION_TASK, 'validation')
  assert len(first) == len(second) == toy.VALIDATION_SIZE
  for a, b in zip(first, second):
    assert a['text'] == b['text']
    np.testing.assert_array_equal(a['inputs'], b['inputs'])
    np.testing.assert_array_equal(a['targets'], b['targets'])


def test_generation_does_not_depend_on_python_hash_seed():
  code = (
      'import sys; sys.path.insert(0, %r); from tasks import toy; '
      'print(repr([toy.generate_examples(n, "validation")[:3] for n in '
      '("toy_colour", "toy_question", "toy_count")]))' % REPO
  )
  outs = []
  for seed in ('1', '2'):
    env = dict(os.environ, PYTHONHASHSEED=seed, TF_CPP_MIN_LOG_LEVEL='3')
    outs.append(
        subprocess.run(
            [sys.executable, '-c', code], env=env, check=True, capture_output=True, text=True
        ).stdout
    )
  assert outs[0] == outs[1]
  expected = repr(
      [
          toy.generate_examples(n, 'validation')[:3]
          for n in ('toy_colour', 'toy_question', 'toy_count')
      ]
  )
  assert outs[0].strip() == expected


def test_split_sizes():
  for name in SCENE_TASKS + LIST_TASKS:
    assert len(toy.generate_examples(name, 'train')) == toy.TRAIN_SIZE
    assert len(toy.generate_examples(name, 'validation')) == toy.VALIDATION_SIZE
  assert len(toy.generate_examples(toy.SPAN_CORRUPTION_TASK, 'train')) == toy.CORPUS_TRAIN_SIZE
  with pytest.raises(ValueError, match='Unknown split'):
    toy.generate_examples('toy_colour', 'test')


def test_scene_pools_are_disjoint_and_cover_all_scenes():
  train, validation = toy.scene_pools()
  assert not set(train.tolist()) & set(validation.tolist())
  assert len(train) + len(validation) == toy.NUM_SCENES


def test_no_validation_scene_occurs_in_any_training_split():
  train_scenes = set()
  for name in SCENE_TASKS:
    for ex in toy.generate_examples(name, 'train'):
      train_scenes.update(_scenes_of(ex['inputs']))
  for doc in toy.corpus_documents('train'):
    train_scenes.update(doc.split(' and '))
  for name in SCENE_TASKS:
    val = toy.generate_examples(name, 'validation')
    scenes = {s for ex in val for s in _scenes_of(ex['inputs'])}
    assert len(scenes) == len(val), f'{name}: repeated validation scenes'
    assert not scenes & train_scenes, name
  for doc in toy.corpus_documents('validation'):
    assert not set(doc.split(' and ')) & train_scenes


def test_word_list_tasks_have_disjoint_splits():
  for name in LIST_TASKS:
    train = {ex['inputs'] for ex in toy.generate_examples(name, 'train')}
    val = [ex['inputs'] for ex in toy.generate_examples(name, 'validation')]
    assert len(set(val)) == len(val)
    assert not set(val) & train, name


# ------------------------------------------------------------------------------------------------
# Formats.
# ------------------------------------------------------------------------------------------------


def test_scene_format_and_world_size():
  assert toy.NUM_SCENES == 5 * 2 * 6 * 8 * 6 * 4 * 8
  s = toy.Scene(0)
  assert s.text() == 'one big red fox sleeps near the house'
  assert toy.Scene(toy.NUM_SCENES - 1).text() == 'five small white wolves jump behind the field'
  for i in range(0, toy.NUM_SCENES, 997):
    _parse_scene(toy.Scene(i).text())


@pytest.mark.parametrize(
    'name,prefix,attribute',
    [
        ('toy_colour', 'colour: ', 'colour'),
        ('toy_animal', 'animal: ', 'animal'),
        ('toy_size', 'size: ', 'size'),
        ('toy_heldout_place', '', 'place'),
        ('toy_heldout_number', '', 'number'),
        ('toy_taskless_colour', '', 'colour'),
        ('toy_taskless_animal', '', 'animal'),
        ('toy_taskless_size', '', 'size'),
    ],
)
def test_attribute_tasks(name, prefix, attribute):
  for split in toy.SPLITS:
    for ex in toy.generate_examples(name, split)[:300]:
      assert ex['inputs'].startswith(prefix)
      scene = _parse_scene(ex['inputs'][len(prefix) :])
      assert ex['targets'] == scene[attribute]
      assert ex['targets'] in toy.CLASS_LABELS[name]


def test_indoor_tasks():
  for name in ('toy_heldout_indoor', 'toy_taskless_indoor'):
    examples = toy.generate_examples(name, 'train')
    for ex in examples[:500]:
      scene = _parse_scene(ex['inputs'])
      assert ex['targets'] == ('yes' if scene['place'] in toy.INDOOR_PLACES else 'no')
    counts = collections.Counter(ex['targets'] for ex in examples)
    assert abs(counts['yes'] / len(examples) - 0.5) < 0.03
  assert toy.HELDOUT_CLASS_LABELS == ('yes', 'no')
  assert toy.HELDOUT_TASK == 'toy_heldout_indoor'


def test_question_task():
  examples = toy.generate_examples('toy_question', 'train')
  kinds = collections.Counter()
  for ex in examples[:2000]:
    m = re.fullmatch(r'(?P<values>[\w ]+)\? (?P<scene>.*)', ex['inputs'])
    assert m, ex
    values = m['values'].split(' or ')
    assert 1 <= len(values) <= 3 and len(set(values)) == len(values)
    scene = _parse_scene(m['scene'])
    kind = [
        k
        for k, vocab in (
            ('colour', toy.COLOURS),
            ('animal', toy.ANIMAL_WORDS),
            ('size', toy.SIZES),
            ('number', toy.NUMBERS),
            ('prep', toy.PREPOSITIONS),
        )
        if values[0] in vocab
    ]
    assert len(kind) == 1, 'places are never asked about'
    assert all(
        v
        in dict(
            colour=toy.COLOURS,
            animal=toy.ANIMAL_WORDS,
            size=toy.SIZES,
            number=toy.NUMBERS,
            prep=toy.PREPOSITIONS,
        )[kind[0]]
        for v in values
    )
    kinds[kind[0]] += 1
    assert ex['targets'] == ('yes' if scene[kind[0]] in values else 'no')
  assert set(kinds) == {'colour', 'animal', 'size'}
  counts = collections.Counter(ex['targets'] for ex in examples)
  assert abs(counts['yes'] / len(examples) - 0.5) < 0.03


def test_count_describe_and_copy_reverse():
  for ex in toy.generate_examples('toy_count', 'train')[:500]:
    words = ex['inputs'].split(': ', 1)[1].split()
    assert ex['inputs'].startswith('count: ') and 1 <= len(words) <= 5
    assert set(words) <= set(toy.ANIMAL_WORDS)
    assert ex['targets'] == toy.NUMBERS[len(words) - 1]
  for ex in toy.generate_examples('toy_describe', 'train')[:500]:
    assert ex['inputs'].startswith('describe: ')
    s = _parse_scene(ex['inputs'][len('describe: ') :])
    assert ex['targets'] == f"{s['size']} {s['colour']} {s['animal']} {s['place']}"
  ops = collections.Counter()
  for ex in toy.generate_examples('toy_copy_reverse', 'train')[:500]:
    op, rest = ex['inputs'].split(': ', 1)
    words = rest.split()
    assert 2 <= len(words) <= 4
    ops[op] += 1
    assert ex['targets'].split() == (words if op == 'copy' else words[::-1])
  assert set(ops) == {'copy', 'reverse'}


def test_every_example_fits_the_feature_lengths(vocab):
  limits = toy.TASK_FEATURE_LENGTHS
  for name in ALL_TASKS:
    for split in toy.SPLITS:
      for ex in toy.generate_examples(name, split):
        for key in ('inputs', 'targets'):
          value = ex[key]
          n = len(value) if isinstance(value, np.ndarray) else len(vocab.encode(value))
          assert n + 1 <= limits[key], (name, split, key, value)


def test_examples_decode_to_their_text(vocab):
  for name in SCENE_TASKS[:3] + LIST_TASKS:
    for ex in toy.generate_examples(name, 'validation')[:50]:
      for key in ('inputs', 'targets'):
        assert vocab.decode(vocab.encode(ex[key])) == ex[key]


# ------------------------------------------------------------------------------------------------
# Span corruption.
# ------------------------------------------------------------------------------------------------


def test_noise_mask_matches_t5_definition():
  rng = np.random.default_rng(0)
  for length in (2, 7, 8, 17, 40, 100, 512):
    for _ in range(20):
      mask = toy.random_spans_noise_mask(length, rng)
      num_noise = min(max(int(round(length * 0.15)), 1), length - 1)
      num_spans = max(int(round(num_noise / 3.0)), 1)
      assert mask.sum() == num_noise
      assert not mask[0] and mask[-1], 'starts with non-noise, ends with noise'
      starts = np.sum(mask[1:] & ~mask[:-1])
      assert starts == num_spans
  assert toy.random_spans_noise_mask(1, rng).tolist() == [False]


def _sentinel_spans(ids, vocab):
  """Splits ids at sentinels -> (sentinel ks, [tokens before first sentinel, after 1st, ...])."""
  base = vocab.vocab_size - vocab.extra_ids
  ks, parts = [], [[]]
  for i in ids:
    if i >= base:
      ks.append(vocab.vocab_size - 1 - i)
      parts.append([])
    else:
      parts[-1].append(int(i))
  return ks, parts


def test_span_corruption_examples(vocab):
  examples = toy.generate_examples(toy.SPAN_CORRUPTION_TASK, 'validation')
  noise, total = 0, 0
  for ex in examples:
    original = vocab.encode(ex['text'])
    in_ks, in_parts = _sentinel_spans(ex['inputs'], vocab)
    tg_ks, tg_parts = _sentinel_spans(ex['targets'], vocab)
    assert in_ks == tg_ks == list(range(len(in_ks))) and in_ks, 'sentinels 0, 1, 2, ... in order'
    assert tg_parts[0] == [], 'targets start with the first sentinel'
    assert all(tg_parts[1:]), 'every noise span is non-empty'
    # Interleave: non-noise_0, noise_0, non-noise_1, noise_1, ...
    rebuilt = []
    for k in range(len(in_ks)):
      rebuilt += in_parts[k] + tg_parts[k + 1]
    rebuilt += in_parts[-1]
    assert rebuilt == original, ex['text']
    noise += sum(len(p) for p in tg_parts)
    total += len(original)
    assert ex['inputs_pretokenized'].count('<extra_id_') == len(in_ks)
  assert 0.12 <= noise / total <= 0.18, noise / total


def test_sentinels_are_the_vocabularys_extra_ids(vocab):
  assert vocab.vocab_size == 400 and vocab.extra_ids == 100
  assert toy.sentinel_id(vocab, 0) == 399
  assert vocab.encode('<extra_id_0>') == [399]
  assert vocab.encode('<extra_id_99>') == [300]


# ------------------------------------------------------------------------------------------------
# seqio registration.
# ------------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
  toy.register()
  toy.register()
  for name in ALL_TASKS:
    assert name in seqio.TaskRegistry.names()
  for name in ALL_MIXTURES:
    assert name in seqio.MixtureRegistry.names()


@pytest.mark.parametrize('name', ALL_TASKS + ALL_MIXTURES)
def test_get_dataset_with_enc_dec_feature_converter(name):
  for split in ('train', 'validation'):
    ds = seqio.get_dataset(
        name,
        task_feature_lengths=toy.TASK_FEATURE_LENGTHS,
        dataset_split=split,
        shuffle=True,
        seed=0,
        num_epochs=1,
        batch_size=4,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
    )
    batch = next(ds.as_numpy_iterator())
    assert batch['encoder_input_tokens'].shape == (4, 16)
    assert batch['decoder_target_tokens'].shape == (4, 8)
    assert batch['decoder_input_tokens'].shape == (4, 8)
    assert (batch['decoder_target_tokens'] == 1).sum(axis=1).tolist() == [1] * 4
    assert (batch['encoder_input_tokens'] == 1).sum(axis=1).tolist() == [1] * 4


def test_task_dataset_keeps_pretokenized_text():
  task = seqio.get_mixture_or_task('toy_colour')
  ex = next(
      task.get_dataset(toy.TASK_FEATURE_LENGTHS, 'validation', shuffle=False).as_numpy_iterator()
  )
  first = toy.generate_examples('toy_colour', 'validation')[0]
  assert ex['inputs_pretokenized'].decode() == first['inputs']
  assert ex['targets_pretokenized'].decode() == first['targets']
  vocab = toy.get_toy_vocabulary()
  assert ex['inputs'].tolist() == vocab.encode(first['inputs']) + [1]


def test_mixed_task_examples_carry_prompt_ids():
  for index, name in enumerate(toy.MIXED_TASKS):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(toy.TASK_FEATURE_LENGTHS, 'validation', shuffle=False)
    ids = {int(ex['prompt_ids']) for ex in ds.take(20).as_numpy_iterator()}
    assert ids == {index}
  mixture = seqio.get_mixture_or_task(toy.MIXED_TASK_MIXTURE)
  ds = mixture.get_dataset(toy.TASK_FEATURE_LENGTHS, 'train', shuffle=True, seed=0)
  seen = {int(ex['prompt_ids']) for ex in ds.take(200).as_numpy_iterator()}
  assert seen == set(range(len(toy.MIXED_TASKS)))


def test_heldout_tasks_are_not_in_training_mixtures():
  backbone = {t.name for t in seqio.get_mixture_or_task(toy.BACKBONE_MIXTURE).tasks}
  assert backbone == set(toy.BACKBONE_RATES)
  assert backbone == {toy.SPAN_CORRUPTION_TASK, *toy.BACKBONE_SUPERVISED_TASKS}
  multitask = {t.name for t in seqio.get_mixture_or_task(toy.MULTITASK_MIXTURE).tasks}
  for name in toy.HELDOUT_TASKS + ('toy_taskless_indoor',):
    assert name not in backbone and name not in multitask
  # The held-out decision rule (indoor places) is never asked by a training question.
  for ex in toy.generate_examples('toy_question', 'train'):
    assert not set(ex['inputs'].split('?')[0].split()) & set(toy.PLACES)


def test_postprocessors_and_metric():
  post = toy.string_label_to_class_id(('yes', 'no'))
  assert post('yes') == 0 and post(b' no ') == 1 and post('maybe') == -1
  assert post('no', example={}, is_target=True) == 1
  assert toy.strip_postprocessor(b' big red fox ') == 'big red fox'
  assert toy.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {'accuracy': 50.0}
  assert toy.accuracy([], []) == {'accuracy': 0.0}
  task = seqio.get_mixture_or_task('toy_heldout_indoor')
  assert task.postprocess_fn('yes') == 0
  assert [f.__name__ for f in task.metric_fns] == ['accuracy']


# ------------------------------------------------------------------------------------------------
# Vocabulary.
# ------------------------------------------------------------------------------------------------


def test_vocabulary_file_and_special_ids(vocab):
  assert os.path.exists(toy.TOY_VOCAB_PATH)
  assert os.path.getsize(toy.TOY_VOCAB_PATH) < 20000
  assert vocab.pad_id == 0 and vocab.eos_id == 1 and vocab.unk_id == 2
  assert vocab.tokenizer.GetPieceSize() == 400  # 300 pieces + 100 sentinels.


def test_every_world_and_label_word_is_one_piece(vocab):
  words = set(toy.world_words())
  for labels in toy.CLASS_LABELS.values():
    words.update(labels)
  for w in sorted(words):
    ids = vocab.encode(w)
    assert len(ids) == 1 and ids[0] != vocab.unk_id, w
  # Arbitrary lowercase/ASCII text still encodes without unknowns.
  ids = vocab.encode('Hello, World! 42 zebras?')
  assert vocab.unk_id not in ids
  assert vocab.decode(ids) == 'Hello, World! 42 zebras?'


@pytest.mark.slow
def test_vocabulary_builder_reproduces_the_committed_model():
  sys.path.insert(0, os.path.join(REPO, 'scripts'))
  try:
    import build_toy_vocab  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  with open(toy.TOY_VOCAB_PATH, 'rb') as f:
    committed = f.read()
  assert build_toy_vocab.build(300) == committed
