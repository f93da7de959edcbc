"""Shared helpers of the sweep tests: tiny sweep specs over the runtime tests' tiny task and model."""

import os
import sys
from typing import Mapping, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'runtime'))

import runtime_testlib as rt  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = rt.REPO
METRIC = 'tiny_count/log_likelihood'


def tiny_spec(
    name: str,
    *,
    axes: str = "{'lr': {'utils.create_learning_rate_scheduler.base_learning_rate': [0.1, 0.3]}}",
    seeds: Sequence[int] = (0, 1),
    steps: int = 3,
    extra: str = '',
    bindings: Optional[Mapping[str, str]] = None,
) -> str:
  """A spec of 3-step prompt-tuning runs of the tiny model on `tiny_count` (2 x 2 by default).

  The data seed is fixed (`train/utils.DatasetConfig.seed`), so runs that differ in the seed differ
  only in the prompt initialization: the same runs can be trained separately or vectorized.
  Macros: CHECKPOINT (a tiny T5X checkpoint at step 0) and VOCAB (seqio's test vocabulary).
  """
  more = ''.join(f'      {k!r}: {v},\n' for k, v in (bindings or {}).items())
  return f"""
from __gin__ import dynamic_registration
from prompt_tuning.sweeps import spec

CHECKPOINT = %gin.REQUIRED
VOCAB = %gin.REQUIRED
spec.Sweep:
  name = {name!r}
  gin_files = ['test/tiny_prompt.gin', 'runs/prompt_finetune.gin']
  bindings = {{
      'INITIAL_CHECKPOINT_PATH': %CHECKPOINT,
      'seqio.SentencePieceVocabulary.sentencepiece_model_file': %VOCAB,
      'MIXTURE_OR_TASK_NAME': 'tiny_count',
      'MIXTURE_OR_TASK_MODULE': 'tiny_task',
      'TASK_FEATURE_LENGTHS': {{'inputs': 24, 'targets': 8}},
      'BATCH_SIZE': 8,
      'PROMPT_LENGTH': 4,
      'TRAIN_STEPS': {steps},
      'EVAL_PERIOD': {steps},
      'EVAL_STEPS': 0,
      'train/utils.DatasetConfig.seed': 7,
      'utils.SaveCheckpointConfig.period': {steps},
      'utils.SaveCheckpointConfig.keep': 1,
{more}  }}
  axes = {axes}
  seeds = {list(seeds)!r}
  metric = {METRIC!r}
{extra}"""


def macro_flags(checkpoint: str) -> list:
  return [f'--gin.CHECKPOINT={rt.q(checkpoint)}', f'--gin.VOCAB={rt.q(rt.vocab_path())}']


def sweep_args(command: str, *args: str) -> list:
  return [rt.PYTHON, '-m', 'prompt_tuning.sweep', command] + list(args)
