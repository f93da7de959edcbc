"""Starting from a checkpoint initializes only what the checkpoint lacks.

`StateBuilder.init_params(rng, only=paths)` (and `train_state.init_subset`, which eval uses) compile
a function that returns those parameters alone, so XLA leaves the backbone's initializers out;
`restore_or_init_params` reads a checkpoint into the abstract parameter tree and initializes the
leaves it leaves abstract. Checked: the values equal the full initialization's bit for bit; the
compiled function is a fraction of the full one and outputs only the listed parameters; restored
leaves come from the checkpoint; and eval's `restore_params` gives what it gave before (full
initialization, then the checkpoint over it).
"""

import jax
import numpy as np
import pytest

from prompt_tuning import params as params_lib
from prompt_tuning.runtime import train_state

PROMPT = 'encoder/prompt/prompt/prompt'
BATCH = 4
LENGTHS = {
    'encoder_input_tokens': 16,
    'decoder_input_tokens': 6,
    'decoder_target_tokens': 6,
    'decoder_loss_weights': 6,
}


def _model():
  import tiny_task  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import adafactor  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import optimizers  # pylint: disable=g-import-not-at-top

  opt = optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*'])),
              adafactor.Adafactor(decay_rate=0.8, step_offset=0),
          ),
      )
  )
  vocab = tiny_task.get_vocabulary()
  module = prompted.PromptEncoderDecoder(t5.get_config('tiny'), prompt_length=4)
  return models.EncoderDecoderModel(module, vocab, vocab, optimizer_def=opt)


@pytest.fixture(scope='module')
def setup():
  from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top

  model = _model()
  partitioner = partitioning.PjitPartitioner(num_partitions=1)
  builder = train_state.StateBuilder(
      model, partitioner, {k: (BATCH, n) for k, n in LENGTHS.items()}
  )
  rng = jax.random.PRNGKey(3)
  full = params_lib.flatten_params(jax.device_get(builder.init_params(rng)))
  return {'model': model, 'partitioner': partitioner, 'builder': builder, 'rng': rng, 'full': full}


def test_a_subset_equals_the_full_initialization_bit_for_bit(setup):
  paths = [PROMPT, 'encoder/layers_1/mlp/wo/kernel', 'decoder/relpos_bias/rel_embedding']
  paths = [p for p in paths if p in setup['full']]
  assert len(paths) >= 2, sorted(setup['full'])[:10]
  sub = jax.device_get(setup['builder'].init_params(setup['rng'], only=paths))
  assert sorted(sub) == sorted(paths)
  for p in paths:
    np.testing.assert_array_equal(sub[p], setup['full'][p])


def test_the_compiled_subset_leaves_the_backbone_out(setup, monkeypatch):
  builder, rng = setup['builder'], setup['rng']
  partition = builder.partitioner.partition
  made = []

  def spy(*args, **kwargs):  # keeps the functions init_params compiles
    made.append(partition(*args, **kwargs))
    return made[-1]

  monkeypatch.setattr(builder.partitioner, 'partition', spy)
  builder.init_params(rng)
  builder.init_params(rng, only=[PROMPT])
  full_c, sub_c = (fn.lower(rng).compile() for fn in made)
  prompt_bytes = setup['full'][PROMPT].nbytes
  backbone_bytes = sum(v.nbytes for p, v in setup['full'].items() if p != PROMPT)
  assert sub_c.memory_analysis().output_size_in_bytes == prompt_bytes
  # (plus the output tuple's pointer table)
  assert full_c.memory_analysis().output_size_in_bytes >= prompt_bytes + backbone_bytes
  # No initializer of the backbone survives: the optimized program is a small fraction.
  assert len(sub_c.as_text()) < 0.2 * len(full_c.as_text()), (
      len(sub_c.as_text()),
      len(full_c.as_text()),
  )


def test_restore_reads_the_checkpoint_and_initializes_the_rest(setup):
  builder, rng, full = setup['builder'], setup['rng'], setup['full']
  ckpt = {p: np.full(v.shape, 0.25, v.dtype) for p, v in full.items() if p != PROMPT}
  seen = {}

  def restore(abstract):
    flat = params_lib.flatten_params(abstract)
    seen['abstract'] = all(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
    flat.update(ckpt)  # what a checkpoint without the prompt gives
    return params_lib.unflatten_params(flat)

  out = params_lib.flatten_params(jax.device_get(builder.restore_or_init_params(rng, restore)))
  assert seen['abstract']  # nothing was initialized before the checkpoint was read
  assert sorted(out) == sorted(full)
  np.testing.assert_array_equal(out[PROMPT], full[PROMPT])
  for p, v in ckpt.items():
    np.testing.assert_array_equal(out[p], v)


def test_eval_restore_params_equals_init_then_checkpoint(setup, tmp_path):
  import runtime_testlib as rt  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import utils  # pylint: disable=g-import-not-at-top

  model, partitioner = setup['model'], setup['partitioner']
  frozen = rt.make_t5x_checkpoint(str(tmp_path / 'frozen'))
  cfg = utils.RestoreCheckpointConfig(
      path=frozen, mode='specific', assignment_map=((r'.*prompt.*', None),)
  )
  params, _ = eval_lib.restore_params(model, cfg, partitioner, BATCH, fallback_init_rng=7)
  got = params_lib.flatten_params(jax.device_get(params))
  # The reference: the whole model initialized, then the checkpoint read over it (the old way).
  shapes = eval_lib.dummy_input_shapes(model, BATCH)
  init = jax.jit(lambda r: model.get_initial_variables(r, shapes)['params'])
  ref = params_lib.flatten_params(
      checkpoints.load_initial_params(
          frozen,
          jax.device_get(init(jax.random.PRNGKey(7))),
          assignment_map=cfg.assignment_map,
          trainable=model.optimizer_def.trainable_filter,
      )
  )
  assert sorted(got) == sorted(ref)
  for p in ref:
    np.testing.assert_array_equal(got[p], np.asarray(ref[p]), err_msg=p)
  assert not np.array_equal(got[PROMPT], np.zeros_like(got[PROMPT]))
