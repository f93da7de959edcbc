"""A T5X user's gin files work after changing only their `import` lines.

`finetune.gin` and `base.gin` below are T5X's `t5x/configs/runs/finetune.gin` and
`t5x/examples/t5/t5_1_1/base.gin` verbatim (reference §1.15 (a), (d)) except for the import lines;
`tiny.gin` overrides the network size like T5X's `small.gin`, and `experiment.gin` is shaped like
T5X's `base_wmt_finetune.gin`. They are parsed and a short model-tuning run is trained in this process
(`import __main__ as train_script` resolves to `train` bound on `__main__`, as `python -m
prompt_tuning.train` does).
"""

import json
import os
import sys

import gin
import numpy as np
import pytest

import runtime_testlib as rt

pytestmark = pytest.mark.slow

IMPORTS_T5X_TO_OURS = {
    'from t5x import gin_utils': 'from prompt_tuning.runtime import gin_utils',
    'from t5x import partitioning': 'from prompt_tuning.runtime import partitioning',
    'from t5x import utils': 'from prompt_tuning.runtime import utils',
    'from t5x import trainer': 'from prompt_tuning.runtime import trainer',
    'from t5x import adafactor': 'from prompt_tuning.runtime import adafactor',
    'from t5x import models': 'from prompt_tuning.runtime import models',
    'from t5x.examples.t5 import network': 'from prompt_tuning.architectures import t5 as network',
}

T5X_FINETUNE_GIN = """\
# Defaults for finetuning with train.py.
#
#
# You must also include a binding for MODEL.
#
# Required to be set:
#
# - MIXTURE_OR_TASK_NAME
# - TASK_FEATURE_LENGTHS
# - TRAIN_STEPS  # includes pretrain steps
# - MODEL_DIR  # automatically set when using xm_launch
# - INITIAL_CHECKPOINT_PATH
#
# When running locally, it needs to be passed in the `gin.MODEL_DIR` flag.
#
# `TRAIN_STEPS` should include pre-training steps, e.g., if pre-trained ckpt
# has 1M steps, TRAIN_STEPS = 1.1M will perform 0.1M fine-tuning steps.
#
# Otherwise, use TRAIN_STEPS_RELATIVE to specify the number of additional
# training steps to perform on top of the initial checkpoint.
#
# Commonly overridden options:
# - DROPOUT_RATE
# - BATCH_SIZE
# - PjitPartitioner.num_partitions
# - Trainer.num_microbatches
# - USE_CACHED_TASKS: Whether to look for preprocessed SeqIO data, or preprocess
#    on the fly. Most common tasks are cached, hence this is set to True by
#    default.

from __gin__ import dynamic_registration

import __main__ as train_script
import seqio
from t5x import gin_utils
from t5x import partitioning
from t5x import utils
from t5x import trainer

# Must be overridden
MODEL_DIR = %gin.REQUIRED
MIXTURE_OR_TASK_NAME = %gin.REQUIRED
TASK_FEATURE_LENGTHS = %gin.REQUIRED
MIXTURE_OR_TASK_MODULE = %gin.REQUIRED
TRAIN_STEPS = %gin.REQUIRED
INITIAL_CHECKPOINT_PATH = %gin.REQUIRED

# Commonly overridden
DROPOUT_RATE = 0.1
USE_CACHED_TASKS = True
BATCH_SIZE = 128

# Sometimes overridden
EVAL_STEPS = 20
EVAL_PERIOD = 1000

# Convenience overrides.
EVALUATOR_USE_MEMORY_CACHE = True
EVALUATOR_NUM_EXAMPLES = None  # Use all examples in the infer_eval dataset.
JSON_WRITE_N_RESULTS = None  # Write all inferences.
# HW RNG is faster than SW, but has limited determinism.
# Most notably it is not deterministic across different
# submeshes.
USE_HARDWARE_RNG = False
# None always uses faster, hardware RNG
RANDOM_SEED = None
TRAIN_STEPS_RELATIVE = None

# DEPRECATED: Import the this module in your gin file.
MIXTURE_OR_TASK_MODULE = None

train_script.train:
  model = %MODEL  # imported from separate gin file
  model_dir = %MODEL_DIR
  train_dataset_cfg = @train/utils.DatasetConfig()
  train_eval_dataset_cfg = @train_eval/utils.DatasetConfig()
  infer_eval_dataset_cfg = @infer_eval/utils.DatasetConfig()
  checkpoint_cfg = @utils.CheckpointConfig()
  partitioner = @partitioning.PjitPartitioner()
  trainer_cls = @trainer.Trainer
  total_steps = %TRAIN_STEPS
  eval_steps = %EVAL_STEPS
  eval_period = %EVAL_PERIOD
  relative_steps = %TRAIN_STEPS_RELATIVE
  random_seed = %RANDOM_SEED
  use_hardware_rng = %USE_HARDWARE_RNG
  summarize_config_fn = @gin_utils.summarize_gin_config
  inference_evaluator_cls = @seqio.Evaluator

partitioning.PjitPartitioner:
  num_partitions = 1
  model_parallel_submesh = None
  logical_axis_rules = @partitioning.standard_logical_axis_rules()

seqio.Evaluator:
  logger_cls = [@seqio.PyLoggingLogger, @seqio.TensorBoardLogger, @seqio.JSONLogger]
  num_examples = %EVALUATOR_NUM_EXAMPLES
  use_memory_cache = %EVALUATOR_USE_MEMORY_CACHE

seqio.JSONLogger:
  write_n_results = %JSON_WRITE_N_RESULTS

train/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'train'
  batch_size = %BATCH_SIZE
  shuffle = True
  seed = None  # use a new seed each run/restart
  use_cached = %USE_CACHED_TASKS
  pack = True
  module = %MIXTURE_OR_TASK_MODULE

train_eval/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = %TASK_FEATURE_LENGTHS
  split = 'validation'
  batch_size = %BATCH_SIZE
  shuffle = False
  seed = 42
  use_cached = %USE_CACHED_TASKS
  pack = True
  module = %MIXTURE_OR_TASK_MODULE

infer_eval/utils.DatasetConfig:
  mixture_or_task_name = %MIXTURE_OR_TASK_NAME
  task_feature_lengths = None  # compute max
  split = 'validation'
  batch_size = %BATCH_SIZE
  shuffle = False
  seed = 42
  use_cached = %USE_CACHED_TASKS
  pack = False
  module = %MIXTURE_OR_TASK_MODULE

utils.CheckpointConfig:
  restore = @utils.RestoreCheckpointConfig()
  save = @utils.SaveCheckpointConfig()
utils.RestoreCheckpointConfig:
  path = %INITIAL_CHECKPOINT_PATH
  mode = 'specific'
  dtype = 'float32'
utils.SaveCheckpointConfig:
  period = 5000
  dtype = 'float32'
  keep = None  # keep all checkpoints
  save_dataset = False  # don't checkpoint dataset state

trainer.Trainer:
  num_microbatches = None
  learning_rate_fn = @utils.create_learning_rate_scheduler()
utils.create_learning_rate_scheduler:
  factors = 'constant'
  base_learning_rate = 0.001
  warmup_steps = 1000
"""

T5X_BASE_GIN = """\
# T5.1.1 Base model.
from __gin__ import dynamic_registration

import seqio
from t5x import adafactor
from t5x import models
from t5x.examples.t5 import network

# ------------------- Loss HParam ----------------------------------------------
Z_LOSS = 0.0001
LABEL_SMOOTHING = 0.0
# NOTE: When fine-tuning the public T5 checkpoints (trained in T5 MeshTF)
# the loss normalizing factor should be set to pretraining batch_size *
# target_token_length.
LOSS_NORMALIZING_FACTOR = None
# Dropout should be specified in the "run" files
DROPOUT_RATE = %gin.REQUIRED

# Vocabulary (shared by encoder and decoder)
VOCABULARY = @seqio.SentencePieceVocabulary()
seqio.SentencePieceVocabulary.sentencepiece_model_file = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"

# ------------------- Optimizer ------------------------------------------------
# `learning_rate` is set by `Trainer.learning_rate_fn`.
OPTIMIZER = @adafactor.Adafactor()
adafactor.Adafactor:
  decay_rate = 0.8
  step_offset = 0
  logical_factor_rules = @adafactor.standard_logical_factor_rules()

# ------------------- Model ----------------------------------------------------
MODEL = @models.EncoderDecoderModel()
models.EncoderDecoderModel:
  module = @network.Transformer()
  input_vocabulary = %VOCABULARY
  output_vocabulary = %VOCABULARY
  optimizer_def = %OPTIMIZER
  z_loss = %Z_LOSS
  label_smoothing = %LABEL_SMOOTHING
  loss_normalizing_factor = %LOSS_NORMALIZING_FACTOR

# ------------------- Network specification ------------------------------------
network.Transformer.config = @network.T5Config()
network.T5Config:
  vocab_size = 32128  # vocab size rounded to a multiple of 128 for TPU efficiency
  dtype = 'bfloat16'
  emb_dim = 768
  num_heads = 12
  num_encoder_layers = 12
  num_decoder_layers = 12
  head_dim = 64
  mlp_dim = 2048
  mlp_activations = ('gelu', 'linear')
  dropout_rate = %DROPOUT_RATE
  logits_via_embedding = False
"""

# Like T5X's small.gin: network overrides only.
TINY_GIN = """\
# T5.1.1 tiny model (for tests).

include 'base.gin'  # imports vocab, optimizer and model.

# ------------------- Network specification overrides --------------------------
network.Transformer.config = @network.T5Config()
network.T5Config:
  vocab_size = 128
  dtype = 'float32'
  emb_dim = 32
  num_heads = 4
  num_encoder_layers = 2
  num_decoder_layers = 2
  head_dim = 8
  mlp_dim = 64
"""

EXPERIMENT_GIN = """\
from __gin__ import dynamic_registration

from t5x import models

include 'finetune.gin'
include 'tiny.gin'
BATCH_SIZE = 8
MIXTURE_OR_TASK_NAME = "tiny_count"
MIXTURE_OR_TASK_MODULE = "tiny_task"
TASK_FEATURE_LENGTHS = {'inputs': 24, 'targets': 8}
DROPOUT_RATE = 0.1
TRAIN_STEPS = 1_003  # 1000 pre-trained steps + 3 fine-tuning steps.
USE_CACHED_TASKS = False
EVAL_STEPS = 2
RANDOM_SEED = 0
LOSS_NORMALIZING_FACTOR = 233472
models.EncoderDecoderModel.predict_batch_with_aux.num_decodes = 4
"""


def _ours(text):
  for t5x_line, our_line in IMPORTS_T5X_TO_OURS.items():
    text = text.replace(t5x_line, our_line)
  return text


def test_only_import_lines_differ_from_t5x():
  for t5x_text in (T5X_FINETUNE_GIN, T5X_BASE_GIN):
    ours = _ours(t5x_text).splitlines()
    theirs = t5x_text.splitlines()
    assert len(ours) == len(theirs)
    changed = [(a, b) for a, b in zip(theirs, ours) if a != b]
    assert changed and all(
        a in IMPORTS_T5X_TO_OURS and IMPORTS_T5X_TO_OURS[a] == b for a, b in changed
    )


# The training run of the T5X files, in a fresh process as a user's `python -m` run: gin keeps its
# registrations for the life of a process, so an in-process run would depend on which tests ran
# before it in the same pytest worker.
_T5X_RUN = """
import json, sys
import gin
import __main__
from prompt_tuning.architectures import t5
from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime import train as train_lib
import tiny_task

configs, out, *bindings = sys.argv[1:]
t5.Transformer = t5.EncoderDecoder  # T5X's examples/t5/network.py calls the encoder-decoder so.
__main__.train = train_lib.train  # `import __main__ as train_script` in T5X's files.
gin_utils.parse_gin_flags([configs], ['experiment.gin'], bindings)
step, state = gin.get_configurable(train_lib.train)()
with open(out, 'w') as f:
  json.dump({'step': int(step), 'frozen': sorted(state.frozen), 'operative': gin.operative_config_str()}, f)
"""


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('gin_compat')
  configs = root / 'configs'
  configs.mkdir()
  (configs / 'finetune.gin').write_text(_ours(T5X_FINETUNE_GIN))
  (configs / 'base.gin').write_text(_ours(T5X_BASE_GIN))
  (configs / 'tiny.gin').write_text(TINY_GIN)
  (configs / 'experiment.gin').write_text(_ours(EXPERIMENT_GIN))
  frozen = rt.make_t5x_checkpoint(str(root / 'pretrained'), step=1000)
  model_dir = str(root / 'model')
  out = str(root / 'result.json')
  # The command line of T5X's docs: --gin_file=experiment.gin --gin.MODEL_DIR=... (+ the vocabulary,
  # which base.gin reads from gs://).
  proc = rt.run(
      [
          sys.executable,
          '-c',
          _T5X_RUN,
          str(configs),
          out,
          f'MODEL_DIR = {rt.q(model_dir)}',
          f'INITIAL_CHECKPOINT_PATH = {rt.q(frozen)}',
          f'seqio.SentencePieceVocabulary.sentencepiece_model_file = {rt.q(rt.vocab_path())}',
      ],
      rt.base_env(),
      timeout=600,
  )
  rt.check_ok(proc, 'training from the T5X gin files')
  with open(out) as f:
    result = json.load(f)
  result.update(model_dir=model_dir, frozen_checkpoint=frozen)
  return result


def test_t5x_gin_files_train(trained):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = trained['model_dir']
  # As in T5X, TRAIN_STEPS counts the 1000 steps of the initial checkpoint: 3 fine-tuning steps.
  assert trained['step'] == 1003
  losses = rt.losses(model_dir)
  assert sorted(losses) == [1001, 1002, 1003] and all(np.isfinite(v) for v in losses.values())
  scalars = rt.read_scalars(os.path.join(model_dir, 'train'))
  assert all(v == pytest.approx(0.001) for v in scalars['learning_rate'].values())
  assert checkpoints.latest_checkpoint_path(model_dir) == os.path.join(model_dir, 'checkpoint_1003')
  # Model tuning (plain Adafactor): every parameter is trainable.
  assert trained['frozen'] == []


def test_t5x_bindings_took_effect(trained):
  op = trained['operative']
  for line in (
      'models.EncoderDecoderModel.predict_batch_with_aux.num_decodes = 4',
      'LOSS_NORMALIZING_FACTOR = 233472',
      'partitioning.PjitPartitioner.num_partitions = 1',
      "utils.create_learning_rate_scheduler.factors = 'constant'",
      'adafactor.Adafactor.decay_rate = 0.8',
      'network.T5Config.emb_dim = 32',
      'train/utils.DatasetConfig.pack = True',
  ):
    assert line in op, line
  with open(os.path.join(trained['model_dir'], 'config.gin')) as f:
    config = f.read()
  assert 'network.T5Config.emb_dim = 32' in config and 'trainer.Trainer' in config
  metrics_file = os.path.join(trained['model_dir'], 'inference_eval', f'{rt.TASK}-metrics.jsonl')
  with open(metrics_file) as f:
    metrics = [json.loads(line) for line in f]
  assert metrics and 'accuracy' in metrics[-1]
  assert 'loss' in rt.read_scalars(os.path.join(trained['model_dir'], 'training_eval', rt.TASK))
