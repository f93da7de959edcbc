"""`python train_with_hooks.py <prompt_tuning.train flags>`: the training entry point with test hooks.

It runs exactly `python -m prompt_tuning.train` (gin's `import __main__ as train_script` finds `train`
here), with two optional environment hooks used by the resume tests:

  HOOK_STEP_DELAY=<seconds>   sleep after every training step (so a test can `kill -9` mid-run);
  HOOK_KILL_IN_SAVE=<step>    SIGKILL this process inside the checkpoint save of that step, right after
                              orbax has written the state and before the checkpoint is committed.
"""

import os
import signal
import time

import jax

from prompt_tuning.train import console_main
from prompt_tuning.train import train  # pylint: disable=unused-import
from prompt_tuning.runtime import trainer


def _install_hooks() -> None:
  delay = float(os.environ.get('HOOK_STEP_DELAY', '0') or 0)
  if delay:
    original = trainer.Trainer._get_train_step  # pylint: disable=protected-access

    def slow_get_train_step(self, batch):
      step_fn = original(self, batch)

      def slow_step(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        jax.block_until_ready(out)
        time.sleep(delay)
        return out

      return slow_step

    trainer.Trainer._get_train_step = slow_get_train_step  # pylint: disable=protected-access

  kill_step = os.environ.get('HOOK_KILL_IN_SAVE')
  if kill_step:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    original_save = ocp.PyTreeCheckpointer.save

    def save_then_die(self, directory, *args, **kwargs):
      item = args[0] if args else kwargs.get('item', kwargs.get('args'))
      result = original_save(self, directory, *args, **kwargs)
      step = int(item['step']) if isinstance(item, dict) and 'step' in item else None
      if step == int(kill_step):
        os.kill(os.getpid(), signal.SIGKILL)
      return result

    ocp.PyTreeCheckpointer.save = save_then_die


if __name__ == '__main__':
  _install_hooks()
  console_main()
