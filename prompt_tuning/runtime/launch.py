"""Shared command-line handling of the train/eval/infer entry points (T5X's flags)."""
import logging as py_logging
import os
import sys
from typing import Callable

from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  if 'gin_file' in FLAGS:
    return
  flags.DEFINE_multi_string('gin_file', default=[], help='Gin files (searched in --gin_search_paths and configs/).')
  flags.DEFINE_multi_string('gin_bindings', default=[], help='Individual gin bindings; --gin.NAME=VALUE also works.')
  flags.DEFINE_list('gin_search_paths', default=['.'], help='Comma-separated directories searched for gin files.')
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data directory (local or gs://).')
  flags.DEFINE_list('seqio_additional_cache_dirs', [], 'Directories searched for cached seqio tasks.')
  flags.DEFINE_boolean('multiprocess_gpu', False, 'Initialize jax.distributed for multi-process GPU/CPU runs.')
  flags.DEFINE_string('coordinator_address', None, 'IP:port of process 0 (with --multiprocess_gpu).')
  flags.DEFINE_integer('process_count', None, 'Number of processes (with --multiprocess_gpu).')
  flags.DEFINE_integer('process_index', None, 'Index of this process (with --multiprocess_gpu).')
  flags.DEFINE_boolean('tpu_multihost', False, 'Call jax.distributed.initialize() with no arguments (TPU pods).')
  flags.DEFINE_string('cpu_collectives', 'gloo', 'CPU collectives implementation for multi-process CPU runs.')


def initialize_distributed() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.multiprocess_gpu:
    if FLAGS.coordinator_address is None or FLAGS.process_count is None or FLAGS.process_index is None:
      raise ValueError('--multiprocess_gpu needs --coordinator_address, --process_count and --process_index.')
    if os.environ.get('JAX_PLATFORMS', '').startswith('cpu'):
      jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
    logging.info('jax.distributed.initialize(%s, %d, %d)', FLAGS.coordinator_address, FLAGS.process_count,
                 FLAGS.process_index)
    jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.process_count,
                               process_id=FLAGS.process_index)
  elif FLAGS.tpu_multihost:
    jax.distributed.initialize()


def main_with_gin(fn: Callable, argv) -> None:
  """Parses gin (with clear errors), sets up TF/TFDS/distributed state, then calls `fn()`."""
  del argv
  import gin  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import gin_utils  # pylint: disable=g-import-not-at-top
  tf.config.experimental.set_visible_devices([], 'GPU')
  logging.set_verbosity(logging.INFO)
  py_logging.getLogger('absl').setLevel(py_logging.INFO)
  if FLAGS.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)
  if FLAGS.seqio_additional_cache_dirs:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.add_global_cache_dirs(FLAGS.seqio_additional_cache_dirs)
  initialize_distributed()
  try:
    gin_utils.parse_gin_flags(FLAGS.gin_search_paths, FLAGS.gin_file, FLAGS.gin_bindings)
    fn()
  except gin_utils.GinConfigError as e:
    print(f'\nERROR: {e}', file=sys.stderr)
    sys.exit(2)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    if os.environ.get('PROMPT_TUNING_TRACEBACK'):
      raise
    print(f'\nERROR: {type(e).__name__}: {e}\n(set PROMPT_TUNING_TRACEBACK=1 for the full traceback)',
          file=sys.stderr)
    sys.exit(1)
