"""User errors end in one clear message (cause and fix), a non-zero exit code and no raw traceback.

Every case runs the real entry point in a subprocess; the cases run concurrently (module fixture).
"""

import os

import numpy as np
import pytest

import runtime_testlib as rt

pytestmark = pytest.mark.slow


def _finish(proc, timeout=400):
  return rt.finish_logged(proc, timeout)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp('errors')
  frozen = rt.make_t5x_checkpoint(str(root / 'frozen'))
  env = rt.base_env(rt.shared_cache_dir(tmp_path_factory))

  def train_args(name, **overrides):
    bindings = rt.prompt_train_bindings(
        str(root / name),
        frozen,
        steps=6,
        period=2,
        eval_period=0,
        eval_steps=0,
        extra={'train.infer_eval_dataset_cfg': 'None'},
    )
    bindings.update(overrides)
    return rt.entry_args('prompt_tuning.train', rt.PROMPT_GIN, bindings)

  typo_gin = root / 'typo.gin'
  typo_gin.write_text(
      'from __gin__ import dynamic_registration\n'
      'from prompt_tuning.runtime import trainer\n'
      'trainer.Trainerr.num_microbatches = 2\n'
  )
  cases = {
      # Learning rate 0.3 for steps 1-2, 3e29 for steps 3-4, then inf: the loss is NaN from step 6 on.
      'nan': train_args(
          'nan',
          **{
              'utils.create_learning_rate_scheduler.factors': "'constant * decay_every'",
              'utils.create_learning_rate_scheduler.decay_factor': '1e30',
              'utils.create_learning_rate_scheduler.steps_per_decay': '2',
          },
      ),
      'missing_task': train_args('missing_task', MIXTURE_OR_TASK_NAME=rt.q('tiny_cont')),
      'unknown_gin_name': train_args('unknown_gin_name') + [f'--gin_file={typo_gin}'],
      'missing_checkpoint': train_args(
          'missing_checkpoint',
          INITIAL_CHECKPOINT_PATH=rt.q(str(root / 'nowhere' / 'checkpoint_1000')),
      ),
      'short_targets': train_args(
          'short_targets', TASK_FEATURE_LENGTHS="{'inputs': 24, 'targets': 3}"
      ),
      'missing_length': train_args('missing_length', TASK_FEATURE_LENGTHS="{'inputs': 24}"),
  }
  procs = {k: rt.popen_logged(v, env, str(root / f'{k}.log')) for k, v in cases.items()}
  out = {k: _finish(p) for k, p in procs.items()}
  out['root'] = str(root)
  return out


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(results):
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top

  msg = rt.assert_clean_error(
      results['nan'], 'NanLossError', 'nan at step 6', 'last good checkpoint', 'learning rate'
  )
  model_dir = os.path.join(results['root'], 'nan')
  assert os.path.join(model_dir, 'checkpoint_4') in msg
  # The checkpoints before the divergence are intact and restorable; nothing later was written.
  assert checkpoints.all_steps(model_dir) == [2, 4]
  assert sorted(n for n in os.listdir(model_dir) if n.startswith('checkpoint_')) == [
      'checkpoint_2',
      'checkpoint_4',
  ]
  raw = checkpoints.restore_checkpoint(checkpoints.latest_checkpoint_path(model_dir))
  assert int(raw['step']) == 4
  prompt = raw['trainable']['encoder']['prompt']['prompt']['prompt']
  assert prompt.shape == (5, 32) and np.all(np.isfinite(prompt))
  losses = rt.losses(model_dir)
  assert all(np.isfinite(losses[s]) for s in range(1, 6)) and not np.isfinite(losses[6])


def test_missing_task(results):
  rt.assert_clean_error(
      results['missing_task'],
      "Unknown seqio task or mixture 'tiny_cont'",
      'tiny_count',
      'MIXTURE_OR_TASK_MODULE',
  )


def test_unknown_gin_name(results):
  proc = results['unknown_gin_name']
  assert proc.returncode == 2
  rt.assert_clean_error(proc, 'trainer.Trainerr', 'gin name is unknown', 'typo.gin')


def test_missing_checkpoint_path(results):
  rt.assert_clean_error(
      results['missing_checkpoint'],
      'INITIAL_CHECKPOINT_PATH',
      os.path.join(results['root'], 'nowhere', 'checkpoint_1000'),
      'does not exist',
  )
  # It fails before compiling anything.
  assert 'Trainable parameters' not in results['missing_checkpoint'].stdout


def test_too_short_target_length(results):
  rt.assert_clean_error(
      results['short_targets'],
      "TASK_FEATURE_LENGTHS['targets'] = 3",
      'tiny_count',
      '5 tokens',
      "'targets': 5",
  )


def test_missing_feature_length(results):
  rt.assert_clean_error(
      results['missing_length'],
      'TASK_FEATURE_LENGTHS',
      "['targets']",
      '--gin.TASK_FEATURE_LENGTHS=',
  )


def test_length_check_policy():
  """Too-long targets are an error, too-long inputs only a warning; the check can be turned off."""
  import tiny_task  # pylint: disable=g-import-not-at-top,unused-import
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  cfg = lambda lengths, split='train': utils.DatasetConfig(rt.TASK, lengths, split, 8, False, None)
  utils.check_feature_lengths(cfg({'inputs': 24, 'targets': 5}))  # longest target: 'three' + EOS
  utils.check_feature_lengths(
      cfg({'inputs': 4, 'targets': 5})
  )  # inputs are truncated: warning only
  with pytest.raises(
      utils.FeatureLengthError, match=r"TASK_FEATURE_LENGTHS\['targets'\] = 4 .* 5 tokens"
  ):
    utils.check_feature_lengths(cfg({'inputs': 24, 'targets': 4}, 'validation'))
  utils.check_feature_lengths(cfg({'inputs': 24, 'targets': 2}, 'validation'), max_examples=0)
