"""A per-example feature other than `prompt_ids` (`task_ids`) reaches a prompt module through
`python -m prompt_tuning.train` from a seqio task: the runtime's conditioning-features door.

The tiny task `tiny_count_tasks` gives example i `task_ids = i % 2`. The prompt module
(`toy_methods.TaskPrompt`, 3 prompts) picks each example's prompt by `task_ids`, so training updates
prompts 0 and 1 and leaves prompt 2 (no example has task 2) where it started, up to Adafactor's
weight decay.
"""

import os

import numpy as np

import runtime_testlib as rt

_GIN = """
from __gin__ import dynamic_registration
import toy_methods
from prompt_tuning.architectures import prompted

prompted.PromptEncoderDecoder.prompt_factory = @toy_methods.task_prompt_factory()
toy_methods.task_prompt_factory.num_tasks = 3
toy_methods.task_prompt_factory.length = 5
"""


def test_task_ids_from_a_seqio_task_reach_the_prompt_module(tmp_path, tmp_path_factory):
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))
  frozen = rt.make_t5x_checkpoint(str(tmp_path / 'frozen'))
  gin_file = tmp_path / 'task_prompt.gin'
  gin_file.write_text(_GIN)
  model_dir = str(tmp_path / 'model')
  bindings = rt.prompt_train_bindings(
      model_dir,
      frozen,
      steps=4,
      period=2,
      eval_period=4,
      extra={
          'MIXTURE_OR_TASK_NAME': rt.q('tiny_count_tasks'),
          'train.infer_eval_dataset_cfg': 'None',
      },
  )
  proc = rt.run(
      rt.entry_args('prompt_tuning.train', list(rt.PROMPT_GIN) + [str(gin_file)], bindings),
      env,
      log_path=model_dir + '.log',
  )
  rt.check_ok(proc, 'training a task-selected prompt')
  banks = [
      np.load(
          os.path.join(
              model_dir, 'numpy_checkpoints', f'checkpoint_{s}', 'encoder.prompt.prompt.prompt.npy'
          )
      )
      for s in (2, 4)
  ]
  assert banks[0].shape == (3, 5, 32)
  change = [
      float(np.abs(banks[1][i] - banks[0][i]).max() / np.abs(banks[0][i]).max()) for i in range(3)
  ]
  assert change[0] > 1e-2 and change[1] > 1e-2, change
  assert change[2] < 1e-4, change
