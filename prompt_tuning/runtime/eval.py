"""T5X-style evaluation entry point: `python -m prompt_tuning.eval --gin_file=... --gin.CHECKPOINT_PATH=...`.

For prompt tuning the usual setup (`runs/prompt_eval.gin`) restores the frozen backbone from
`CHECKPOINT_PATH` with the prompt excluded by `assignment_map`, and initializes the prompt from
`PROMPT_FILE` through its gin initializer (`prompts.np_load`), so a saved `.npy` prompt plus the frozen
checkpoint reproduce the metrics seen during training.
"""

import json
from absl import logging
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np
import seqio

from prompt_tuning import fs
from prompt_tuning.runtime import checkpoints
from prompt_tuning.runtime import faults
from prompt_tuning.runtime import gin_utils
from prompt_tuning.runtime import inference
from prompt_tuning.runtime import partitioning
from prompt_tuning.runtime import train_state as train_state_lib
from prompt_tuning.runtime import utils


def dummy_input_shapes(model, batch_size: int, length: int = 8) -> Mapping[str, tuple]:
  if 'EncDec' in getattr(model.FEATURE_CONVERTER_CLS, '__name__', ''):
    return {
        'encoder_input_tokens': (batch_size, length),
        'decoder_input_tokens': (batch_size, length),
        'decoder_target_tokens': (batch_size, length),
    }
  return {
      'decoder_input_tokens': (batch_size, length),
      'decoder_target_tokens': (batch_size, length),
  }


def params_mesh_axes(model, partitioner, batch_size: int, length: int = 8):
  """Mesh PartitionSpecs of the model's parameters (from their logical axis names)."""
  shapes = dummy_input_shapes(model, batch_size, length)
  variables = jax.eval_shape(
      lambda r: model.get_initial_variables(r, shapes), jax.random.PRNGKey(0)
  )
  logical = train_state_lib.logical_axes(variables.get('params_axes'), variables['params'])
  return partitioner.logical_to_mesh_axes(logical)


def restore_params(
    model,
    restore_checkpoint_cfg: Optional[utils.RestoreCheckpointConfig],
    partitioner,
    batch_size: int,
    fallback_init_rng: Optional[int] = 0,
):
  """Parameters for inference: the checkpoint's per the restore config, the rest freshly initialized
  (seeded); a fresh model without a checkpoint.

  Returns the parameters placed on the partitioner's mesh (sharded by their logical axes).
  """
  shapes = dummy_input_shapes(model, batch_size)
  path = restore_checkpoint_cfg.path if restore_checkpoint_cfg is not None else None
  if isinstance(path, (list, tuple)):
    path = path[0] if path else None
  if not path and fallback_init_rng is None:
    raise ValueError(
        'No checkpoint to evaluate: set CHECKPOINT_PATH (utils.RestoreCheckpointConfig.path) '
        'or fallback_init_rng to evaluate a freshly initialized model.'
    )
  if path and not checkpoints.path_exists(str(path)):
    raise FileNotFoundError(
        f'CHECKPOINT_PATH {str(path)!r} does not exist. Point --gin.CHECKPOINT_PATH at a T5X '
        'checkpoint_<step> directory, a Hugging Face T5 directory or one of our checkpoint_<step> directories.'
    )
  rng = jax.random.PRNGKey(fallback_init_rng or 0)
  init = lambda r: model.get_initial_variables(r, shapes)['params']
  if not path:
    params = jax.jit(init)(rng)
  else:
    if restore_checkpoint_cfg.mode == 'latest' and checkpoints.latest_checkpoint_path(path):
      path = checkpoints.latest_checkpoint_path(path)
    # Read into the abstract tree; only what the checkpoint lacks (a prompt read from a file
    # later, a method's parameters) is initialized: the backbone's initializers never run.
    params = checkpoints.load_initial_params(
        path,
        jax.eval_shape(init, rng),
        assignment_map=restore_checkpoint_cfg.assignment_map,
        fallback_to_scratch=restore_checkpoint_cfg.fallback_to_scratch,
        dtype=restore_checkpoint_cfg.dtype,
        strict=restore_checkpoint_cfg.strict,
        trainable=getattr(model.optimizer_def, 'trainable_filter', None),
        allow_partial_frozen=restore_checkpoint_cfg.allow_partial_frozen,
    )
    params = train_state_lib.fill_abstract(
        params, lambda paths: train_state_lib.init_subset(init, rng, paths)
    )
  axes = params_mesh_axes(model, partitioner, batch_size)
  return (
      jax.tree_util.tree_map(
          lambda x, s: jax.device_put(np.asarray(x), s),
          jax.device_get(params),
          partitioner.mesh_axes_to_sharding(axes),
      ),
      axes,
  )


def _checkpoint_step(restore_cfg: Optional[utils.RestoreCheckpointConfig]) -> int:
  path = restore_cfg.path if restore_cfg is not None else None
  if isinstance(path, (list, tuple)):
    path = path[0] if path else None
  return int(checkpoints.checkpoint_step(str(path)) or 0) if path else 0


def evaluate(
    *,
    model,
    dataset_cfg: utils.DatasetConfig,
    restore_checkpoint_cfg: Optional[utils.RestoreCheckpointConfig],
    partitioner: Optional[partitioning.PjitPartitioner] = None,
    output_dir: str,
    inference_evaluator_cls=seqio.Evaluator,
    summarize_config_fn: Optional[Callable] = None,
    fallback_init_rng: Optional[int] = None,
    training_evaluator_cls=None,
    use_orbax: bool = True,
    train_state_initializer_cls=None,
    train_eval_get_dataset_fn=None,
) -> Mapping[str, Any]:
  """Runs seqio evaluation of the restored parameters; writes metrics under `output_dir`."""
  del training_evaluator_cls, use_orbax, train_state_initializer_cls, train_eval_get_dataset_fn
  if output_dir is None:
    raise ValueError('EVAL_OUTPUT_DIR is not set: pass --gin.EVAL_OUTPUT_DIR="\'/path\'".')
  if jax.process_index() == 0:
    faults.check_output_dir(output_dir, 'EVAL_OUTPUT_DIR')  # Before any work.
  partitioner = partitioner or partitioning.PjitPartitioner(num_partitions=1)
  utils.import_module(dataset_cfg.module)
  utils.get_mixture_or_task(dataset_cfg.mixture_or_task_name)
  params, axes = restore_params(
      model, restore_checkpoint_cfg, partitioner, dataset_cfg.batch_size, fallback_init_rng
  )
  if jax.process_index() == 0:
    fs.makedirs(fs.join(output_dir, 'inference_eval'))
    if summarize_config_fn is not None:
      summarize_config_fn(output_dir, None, 0)
  evaluator = inference.InferenceEvaluator(
      dataset_cfg, inference_evaluator_cls, model, partitioner, log_dir=output_dir, params_axes=axes
  )
  # As T5X, the metrics are logged at the step of the evaluated checkpoint (0 when it has none).
  results = evaluator.evaluate(params, step=_checkpoint_step(restore_checkpoint_cfg))
  if jax.process_index() == 0:
    fs.write_text(
        fs.join(output_dir, 'metrics.json'),
        json.dumps(
            {k: {m: float(np.asarray(v)) for m, v in d.items()} for k, d in results.items()},
            indent=1,
        ),
    )
  for task, metrics in results.items():
    logging.info('eval %s: %s', task, metrics)
  return results
