"""`python sharded_run.py OUT_JSON MODEL_DIR NUM_PARTITIONS`: a tiny model-tuning run, in this process.

Runs `train()` with configs/test/tiny_model_tuning.gin + configs/runs/model_finetune.gin (gin's
`import __main__ as train_script` finds `train` here) and writes to OUT_JSON the device count, the
mesh, the `.sharding.spec` of every train-state leaf and the per-step losses. Used by
test_partitioning.py with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

import json
import sys

import gin
import jax

from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime import train_state as train_state_lib
from prompt_tuning.runtime.train import train
import runtime_testlib as rt


def specs(tree):
  return {
      path: [a if a is None or isinstance(a, str) else list(a) for a in leaf.sharding.spec]
      for path, leaf in train_state_lib.flatten(tree).items()
  }


def main(out_json: str, model_dir: str, num_partitions: int) -> None:
  bindings = rt.model_tuning_bindings(model_dir, num_partitions=num_partitions)
  gin_utils.parse_gin_flags([], rt.MODEL_TUNING_GIN, [f'{k} = {v}' for k, v in bindings.items()])
  step, state = gin.get_configurable(train)()
  opt = jax.tree_util.tree_map(lambda x: x, state.opt_state.param_states)
  result = {
      'step': int(step),
      'devices': jax.device_count(),
      'trainable': specs(state.trainable),
      'frozen': specs(state.frozen) if state.frozen else {},
      'opt_state': {
          p: [a if a is None or isinstance(a, str) else list(a) for a in leaf.sharding.spec]
          for p, leaf in zip(*_flat_with_paths(opt))
      },
      'losses': rt.losses(model_dir),
  }
  with open(out_json, 'w') as f:
    json.dump(result, f, indent=1)


def _flat_with_paths(tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [
      '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path) for path, _ in leaves
  ], [leaf for _, leaf in leaves]


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
