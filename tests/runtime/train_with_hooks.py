"""`python train_with_hooks.py <prompt_tuning.train flags>`: the training entry point with test hooks.

It runs exactly `python -m prompt_tuning.train` (gin's `import __main__ as train_script` finds `train`
here), with two optional environment hooks used by the resume tests:

  HOOK_STEP_DELAY=<seconds>   sleep after every training step (so a test can `kill -9` mid-run);
  HOOK_KILL_IN_SAVE=<step>    SIGKILL this process inside the checkpoint save of that step, right after
                              orbax has written the state and before the checkpoint is committed;
  HOOK_ENOSPC_IN_SAVE=<step>  fail the orbax write of that step as a full disk does: a partial
                              `*.orbax-checkpoint-tmp` directory, then TensorStore's RESOURCE_EXHAUSTED
                              error with os_error_code 28 (what orbax raised on a full tmpfs).
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

  enospc_step = os.environ.get('HOOK_ENOSPC_IN_SAVE')
  if enospc_step:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    original = ocp.PyTreeCheckpointer.save

    def save_on_full_disk(self, directory, *args, **kwargs):
      item = args[0] if args else kwargs.get('item', kwargs.get('args'))
      step = int(item['step']) if isinstance(item, dict) and 'step' in item else None
      if step != int(enospc_step):
        return original(self, directory, *args, **kwargs)
      partial = f'{directory}.orbax-checkpoint-tmp'
      os.makedirs(os.path.join(partial, 'ocdbt.process_0', 'd'), exist_ok=True)
      with open(os.path.join(partial, 'ocdbt.process_0', 'd', 'e9f8d7d2'), 'wb') as f:
        f.write(b'\0' * 4096)
      raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "trainable.encoder.prompt.prompt.prompt/0.0" in OCDBT '
          f'database at local file "{partial}/ocdbt.process_0/": Failed writing: '
          f'"{partial}/ocdbt.process_0/d/e9f8d7d2": Failed to write 2163704 bytes to file 14: No '
          "space left on device [os_error_code='28']"
      )

    ocp.PyTreeCheckpointer.save = save_on_full_disk


if __name__ == '__main__':
  _install_hooks()
  console_main()
