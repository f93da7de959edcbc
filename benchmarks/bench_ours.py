"""Benchmark worker for prompt_tuning (JAX/Flax): one section per process.

    python -m benchmarks.bench_ours --section train --shapes full --workdir W --prompt-length 20 \
        --out W/ours_train_20.json

Run alone it does setup, the repetitions and writes `--out`; `benchmarks.run` drives it through
`--reply-fd` instead (see `common.run_worker`) to interleave its repetitions with PEFT's.

Sections:
  train   the runtime's own `Trainer` (jitted train step, state donated, prompt-only T5X Adafactor
          through `MultiOptimizer`, the state built by `train_state.StateBuilder`), host (numpy) batches;
          examples/s, FLOPs of the compiled step (`cost_analysis`), FLOP/s of a large matmul
          measured in the same process after every repetition, peak RSS.
  serve   teacher-forced scoring (`EncoderDecoderModel.score_batch`: logits -> per-example
          log-likelihood) of one mixed-task batch (`PromptBank`, one prompt per example through
          `prompt_ids`) and of the same batch with a single prompt; and greedy generation of
          `targets` tokens for the mixed-task batch (`predict_batch_with_aux`, EOS suppressed).
  decode  greedy decoding of exactly `decode_tokens` tokens with the KV cache
          (`predict_batch_with_aux`, `temperature_sample` with topk=1, EOS suppressed).
  realistic_{sst2,rte,boolq}
          training on the input-length distribution of the task: fixed padding to 512 (T5X,
          no packing) vs length buckets (`RealisticBench`).
  dots    `jnp.dot` FLOP/s at the backbone's matmul shapes in float32, bfloat16 and bfloat16
          with float32 results (the bfloat16 section).

`PROMPT_TUNING_BENCH_GIN` (gin bindings, one per line; `benchmarks.run --ours-gin`) is parsed before
any section is built, for example `training_forward_compiler_options.cpu_float32_dots = 'eigen'`
(the split training step, `trainer.SplitTrainStep`); the bindings are recorded with each result.

`--dtype bfloat16` runs bfloat16 activations, whose dense matmuls accumulate in float32 on the CPU
(`layers.dense_dot`); `--dots plain` turns that off (bfloat16 x bfloat16 -> bfloat16 dots, the
layers before the change), for the before/after row of the bfloat16 section.
"""

import dataclasses
import gc
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import numpy as np  # pylint: disable=g-import-not-at-top

from benchmarks import common  # pylint: disable=g-import-not-at-top


def _setup_jax(args):
  import jax  # pylint: disable=g-import-not-at-top

  if args.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  return jax


class _Matmul:
  """FLOP/s of a jitted `n x n` matmul in `dtype` (the utilisation reference)."""

  def __init__(self, jax, n: int, dtype):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    self.a = jax.random.normal(ka, (n, n), dtype)
    self.b = jax.random.normal(kb, (n, n), dtype)
    self.f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dtype))
    self.f(self.a, self.b).block_until_ready()
    self.n, self.dtype = n, str(jnp.dtype(dtype))
    self.times = []

  def measure(self, reps: int) -> None:
    self.times += common.timed(lambda: self.f(self.a, self.b).block_until_ready(), reps)

  def result(self) -> dict:
    return {
        'n': self.n,
        'dtype': self.dtype,
        'times_s': self.times,
        'flops_per_s': common.matmul_flops(self.n) / common.median(self.times),
    }


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get('flops', float('nan')))


def _load(args, prompt_length: int, num_prompts=None):
  """`(config, params)` of the prompted model: the HF checkpoint plus the benchmark's prompts."""
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  config, params = huggingface.load_t5(
      os.path.join(args.workdir, 'hf_t5'), dtype=args.dtype, dropout_rate=args.dropout
  )
  flat = t5.flatten_params(params)
  bank = common.prompt_bank(num_prompts or 1, prompt_length, config.emb_dim)
  flat['encoder/prompt/prompt/prompt'] = bank if num_prompts else bank[0]
  if args.remat is not None:
    config = dataclasses.replace(
        config, remat={'False': False, 'True': True}.get(args.remat, args.remat)
    )
  return config, t5.unflatten_params(flat)


def _model(config, prompt_length: int, num_prompts=None, with_optimizer: bool = True):
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import adafactor  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import decoding  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import models  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import optimizers  # pylint: disable=g-import-not-at-top

  module = prompted.PromptEncoderDecoder(
      config, prompt_length=prompt_length, num_prompts=num_prompts
  )
  opt = None
  if with_optimizer:
    # configs/models/t5_1_1_prompt.gin: T5X Adafactor on `.*/prompt/.*` only.
    opt = optimizers.MultiOptimizer(
        (
            (
                optimizers.ModelParamTraversal(optimizers.match_any(['.*/prompt/.*'])),
                adafactor.Adafactor(
                    decay_rate=0.8,
                    step_offset=0,
                    multiply_by_parameter_scale=False,
                    weight_decay_rate=1e-5,
                    logical_factor_rules=adafactor.standard_logical_factor_rules(),
                ),
            ),
        )
    )
  # Mean token cross entropy without z-loss: the same objective as PEFT/transformers, so the
  # first-step losses can be compared.
  return models.EncoderDecoderModel(
      module,
      None,
      None,
      optimizer_def=opt,
      decode_fn=decoding.temperature_sample,
      z_loss=0.0,
      loss_normalizing_factor='NUM_REAL_TARGET_TOKENS',
  )


class TrainBench:
  """Training through the runtime's `Trainer`."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'rss_mb': {'start': common.rss_mb()}}
    self.times = []

  def setup(self) -> dict:
    args, shapes, res = self.args, self.shapes, self.res
    t_setup = time.perf_counter()
    jax = self.jax = _setup_jax(args)
    from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import schedules  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

    res['tensorflow_imported'] = 'tensorflow' in sys.modules
    res['rss_mb']['imports'] = common.rss_mb()
    p = args.prompt_length
    config, params = _load(args, p)
    res['rss_mb']['loaded'] = common.rss_mb()
    model = _model(config, p)
    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    self.batches = batches = common.train_batches(shapes)
    builder = train_state.StateBuilder(
        model,
        partitioner,
        {k: v.shape for k, v in batches[0].items()},
        {k: v.dtype for k, v in batches[0].items()},
    )
    state = builder.build(params)
    del params
    gc.collect()
    res['rss_mb']['state'] = common.rss_mb()
    res['params'] = {
        'trainable': sum(int(x.size) for x in jax.tree_util.tree_leaves(state.trainable)),
        'frozen': sum(int(x.size) for x in jax.tree_util.tree_leaves(state.frozen)),
    }
    lr_fn = schedules.create_learning_rate_scheduler(factors='constant', base_learning_rate=0.3)
    self.trainer = trainer = trainer_lib.Trainer(
        model,
        state,
        partitioner,
        eval_names=[],
        summary_dir=None,
        train_state_axes=builder.state_axes,
        rng=jax.random.PRNGKey(0),
        learning_rate_fn=lr_fn,
        log_period=10**9,
    )
    self.matmul = _Matmul(jax, shapes.matmul_size, config.activation_dtype)
    placed = trainer.place_batch(batches[0])
    step_fn = self.step_fn = trainer._get_train_step(placed)  # pylint: disable=protected-access
    self.cache = [step_fn.cache_size()]
    t0 = time.perf_counter()
    first = self._run(1)  # traces and compiles
    res['first_step_s'] = time.perf_counter() - t0
    res['first_loss'] = first.get('loss')
    self.cache.append(step_fn.cache_size())
    res['rss_mb']['compiled'] = common.rss_mb()
    # Step 2 must not trace or compile again (see jit_cache_entries; an unplaced `state.step`
    # from StateBuilder used to cause that).
    t0 = time.perf_counter()
    self._run(1)
    res['second_step_s'] = time.perf_counter() - t0
    self.cache.append(step_fn.cache_size())
    # FLOPs of the compiled step. The persistent compilation cache makes this a cache hit.
    t0 = time.perf_counter()
    args = (trainer.train_state, placed, trainer._base_rng)  # pylint: disable=protected-access
    if isinstance(step_fn, trainer_lib.SplitTrainStep):
      # Forward (Eigen dots) and backward (YNNPACK) executables: the step's FLOPs are their sum.
      executables = step_fn.compile(*args)
    else:
      executables = (step_fn.lower(*args).compile(),)
    res['cost_analysis_compile_s'] = time.perf_counter() - t0
    res['executables_per_step'] = len(executables)
    res['flops_per_step'] = sum(_flops(c) for c in executables)
    try:
      mems = [c.memory_analysis() for c in executables]
      res['xla_memory_mb'] = {
          k: sum(getattr(m, f'{k}_size_in_bytes') for m in mems) / 2**20
          for k in ('argument', 'output', 'alias', 'temp', 'generated_code')
      }
    except Exception:  # pylint: disable=broad-except
      res['xla_memory_mb'] = None
    del executables
    res['setup_s'] = time.perf_counter() - t_setup
    return {'setup_s': res['setup_s']}

  def _run(self, n):
    it = (self.batches[i % len(self.batches)] for i in range(n))
    return self.trainer.train(it, n)

  def rep(self) -> dict:
    t0 = time.perf_counter()
    self._run(self.shapes.train_steps)
    dt = time.perf_counter() - t0
    self.times.append(dt)
    self.matmul.measure(self.shapes.matmul_reps)
    return {'s': dt}

  def finish(self) -> dict:
    res, shapes = self.res, self.shapes
    self.cache.append(self.step_fn.cache_size())
    res['jit_cache_entries'] = dict(
        zip(('start', 'after_step_1', 'after_step_2', 'after_timing'), self.cache)
    )
    res['last_loss'] = self.trainer.loss_history[max(self.trainer.loss_history)]
    step_times = [t / shapes.train_steps for t in self.times]
    res.update(
        {
            'rep_times_s': self.times,
            'steps_per_rep': shapes.train_steps,
            'batch': shapes.batch,
            'step_times_s': step_times,
            'examples_per_s': [shapes.batch / t for t in step_times],
            'matmul': self.matmul.result(),
        }
    )
    res['matmul_flops_per_s'] = res['matmul']['flops_per_s']
    res['achieved_flops_per_s'] = res['flops_per_step'] / common.median(step_times)
    res['utilisation'] = res['achieved_flops_per_s'] / res['matmul_flops_per_s']
    res['peak_rss_mb'] = common.peak_rss_mb()
    res['memory_map_mb'] = common.memory_map()  # between steps, after the timed ones
    return res


class RealisticBench:
  """Training on realistic input lengths: T5X fixed padding vs length buckets.

  Both variants batch the same example stream (`common.realistic_examples`) and train through the
  runtime's `Trainer`: `fixed` pads every batch to `realistic_max_inputs` (T5X without packing, the
  paper's recipe), `bucketed` forms batches within the buckets that `BucketConfig()`'s defaults
  choose (4, plus the full length) and `bucketed_8` within 8. Each repetition times a stratified
  sample of each variant's batches (`common.timed_batches`); every bucket shape is compiled in
  setup, once (the jit cache entries are reported).
  """

  def __init__(self, args, shapes, dist):
    self.args, self.shapes, self.dist = args, shapes, common.DISTRIBUTIONS[dist]
    self.res = {'distribution': dist}

  def setup(self) -> dict:
    args, shapes, res, dist = self.args, self.shapes, self.res, self.dist
    jax = self.jax = _setup_jax(args)
    from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import schedules  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import train_state  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

    t0 = time.perf_counter()
    p = args.prompt_length
    config, params = _load(args, p)
    model = _model(config, p)
    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    examples = common.realistic_examples(shapes, dist)
    b, full, tgt = shapes.batch, shapes.realistic_max_inputs, shapes.realistic_targets
    plans = {'fixed': common.fixed_plan(examples, b, full)}
    res['buckets'] = {}
    for name, k in (('bucketed', 4), ('bucketed_8', 8)):
      lengths = common.bucket_lengths(shapes, dist, k)
      res['buckets'][name] = list(lengths)
      plans[name] = common.bucketed_plan(examples, b, lengths)
    res['padding_fraction'] = {n: common.padding_fraction(examples, pl) for n, pl in plans.items()}
    res['mean_input_tokens'] = float(np.mean([len(e['inputs']) for e in examples]))
    res['stream_examples'] = len(examples)
    self.batches = {}
    for name, plan in plans.items():
      k = shapes.realistic_timed_fixed if name == 'fixed' else shapes.realistic_timed
      timed = common.timed_batches(plan, k)
      res[f'{name}_timed_padding_fraction'] = common.padding_fraction(examples, timed)
      self.batches[name] = [common.realistic_batch(examples, rows, n, tgt) for rows, n in timed]
    first = self.batches['fixed'][0]
    builder = train_state.StateBuilder(
        model,
        partitioner,
        {k: v.shape for k, v in first.items()},
        {k: v.dtype for k, v in first.items()},
    )
    self.trainer = trainer_lib.Trainer(
        model,
        builder.build(params),
        partitioner,
        eval_names=[],
        summary_dir=None,
        train_state_axes=builder.state_axes,
        rng=jax.random.PRNGKey(0),
        learning_rate_fn=schedules.create_learning_rate_scheduler(
            factors='constant', base_learning_rate=0.3
        ),
        log_period=10**9,
    )
    del params
    gc.collect()
    # Compile every shape once (each variant's distinct shapes), then time without compilation.
    shapes_seen = {}
    for name, batches in self.batches.items():
      for batch in batches:
        shape = batch['encoder_input_tokens'].shape
        if shape not in shapes_seen:
          shapes_seen[shape] = name
          self.trainer.train(iter([batch]), 1)
    self.shapes_compiled = sorted(shapes_seen)
    step = self.trainer._partitioned_train_step  # pylint: disable=protected-access
    res['jit_cache_entries_after_setup'] = step.cache_size()
    res['distinct_shapes'] = len(shapes_seen)
    res['setup_s'] = time.perf_counter() - t0
    for name in self.batches:
      res[f'{name}_times_s'] = []
    return {'setup_s': res['setup_s']}

  def _run(self, batches):
    self.trainer.train(iter(batches), len(batches))

  def rep(self) -> dict:
    return common.rep_variants(
        self.res, {name: (lambda b=b: self._run(b)) for name, b in self.batches.items()}
    )

  def finish(self) -> dict:
    res = self.res
    for name, batches in self.batches.items():
      res[f'{name}_examples_per_s'] = [
          len(batches) * self.shapes.batch / t for t in res[f'{name}_times_s']
      ]
    step = self.trainer._partitioned_train_step  # pylint: disable=protected-access
    res['jit_cache_entries_after_timing'] = step.cache_size()
    res['peak_rss_mb'] = common.peak_rss_mb()
    return res


class DotsBench:
  """`jnp.dot` FLOP/s at the backbone's matmul shapes: float32, bfloat16 -> bfloat16 (what the
  layers emit with bfloat16 activations) and bfloat16 -> float32 (`preferred_element_type`)."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'shapes': [list(x) for x in common.dot_shapes(shapes)]}
    self.fns = {}

  def setup(self) -> dict:
    jax = _setup_jax(self.args)
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    rng = np.random.RandomState(0)
    for m, k, n in common.dot_shapes(self.shapes):
      a32 = rng.standard_normal((m, k)).astype(np.float32)
      b32 = rng.standard_normal((k, n)).astype(np.float32)
      for name, dtype, out in (
          ('f32', jnp.float32, None),
          ('bf16', jnp.bfloat16, None),
          ('bf16_f32acc', jnp.bfloat16, jnp.float32),
      ):
        a, b = jax.device_put(a32.astype(dtype)), jax.device_put(b32.astype(dtype))
        f = jax.jit(lambda x, y, out=out: jnp.dot(x, y, preferred_element_type=out))
        f(a, b).block_until_ready()
        key = f'{name}_{m}x{k}x{n}'
        self.fns[key] = lambda f=f, a=a, b=b: f(a, b).block_until_ready()
        self.res[f'{key}_times_s'] = []
        self.res[f'{key}_flops'] = 2.0 * m * k * n
    return {}

  def rep(self) -> dict:
    return common.rep_variants(self.res, self.fns)

  def finish(self) -> dict:
    for key in self.fns:
      self.res[f'{key}_gflops'] = (
          self.res[f'{key}_flops'] / common.median(self.res[f'{key}_times_s']) / 1e9
      )
    self.res['xla_flags'] = os.environ.get('XLA_FLAGS', '')
    return self.res


def _no_eos(logits, state):
  """Masks EOS so that every example decodes exactly the requested number of tokens."""
  del state
  return logits.at[:, common.EOS_ID].set(-1e10)


class ServeBench:
  """Scoring a mixed-task batch (prompt bank) and the same batch with a single prompt."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'batch': shapes.serve_batch, 'tasks': shapes.serve_tasks}
    self.fns = {}

  def setup(self) -> dict:
    args, shapes, res = self.args, self.shapes, self.res
    jax = self.jax = _setup_jax(args)
    import numpy as np  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top

    p = args.prompt_length
    batch = common.serve_batch(shapes)
    single_batch = {k: v for k, v in batch.items() if k != 'prompt_ids'}
    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    for name, num_prompts, b in (
        ('mixed', shapes.serve_tasks, batch),
        ('single', None, single_batch),
    ):
      config, params = _load(args, p, num_prompts)
      model = _model(config, p, num_prompts, with_optimizer=False)
      params = jax.device_put(params)
      # As the runtime's inference path (runtime/inference.py): a partitioned jitted step, host
      # (numpy) batch.
      options = xla_options.inference_compiler_options(model)
      fn = partitioner.partition(
          lambda prm, bt, m=model: m.score_batch(prm, bt),
          in_axis_resources=None,
          out_axis_resources=None,
          compiler_options=options,
      )
      t0 = time.perf_counter()
      scores = np.asarray(jax.device_get(fn(params, b)))
      res[f'{name}_first_call_s'] = time.perf_counter() - t0
      res[f'{name}_scores'] = scores.tolist()
      res[f'{name}_times_s'] = []
      self.fns[name] = (fn, params, b)
      if name == 'mixed':
        # Serving by generation: greedy decoding of the labels for the same mixed-task batch.
        n = shapes.targets
        gen_batch = {
            'encoder_input_tokens': b['encoder_input_tokens'],
            'prompt_ids': b['prompt_ids'],
            'decoder_input_tokens': np.zeros((shapes.serve_batch, n), np.int32),
        }

        def generate(prm, bt, m=model):
          return m.predict_batch_with_aux(
              prm, bt, decoder_params={'topk': 1, 'logit_callback_fn': _no_eos}
          )[0]

        gen = partitioner.partition(
            generate, in_axis_resources=None, out_axis_resources=None, compiler_options=options
        )
        t0 = time.perf_counter()
        tokens = np.asarray(jax.device_get(gen(params, gen_batch)))
        res['mixed_generate_first_call_s'] = time.perf_counter() - t0
        res['mixed_generate_tokens'] = tokens.tolist()
        res['mixed_generate_times_s'] = []
        self.fns['mixed_generate'] = (gen, params, gen_batch)
    return {}

  def rep(self) -> dict:
    block = self.jax.block_until_ready
    return common.rep_variants(
        self.res,
        {
            name: (lambda fn=fn, params=params, b=b: block(fn(params, b)))
            for name, (fn, params, b) in self.fns.items()
        },
    )

  def finish(self) -> dict:
    return common.finish_variants(self.res, list(self.fns), self.shapes.serve_batch)


class DecodeBench:
  """Greedy decoding with the KV cache through `predict_batch_with_aux`."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'times_s': []}

  def setup(self) -> dict:
    args, shapes = self.args, self.shapes
    jax = self.jax = _setup_jax(args)
    import numpy as np  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import partitioning  # pylint: disable=g-import-not-at-top
    from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top

    p = args.prompt_length
    config, params = _load(args, p)
    model = _model(config, p, with_optimizer=False)
    self.params = jax.device_put(params)
    enc = common.decode_inputs(shapes)
    n = shapes.decode_tokens
    self.batch = {
        'encoder_input_tokens': enc,
        'decoder_input_tokens': np.zeros((enc.shape[0], n), np.int32),
    }

    def predict(prm, bt):
      return model.predict_batch_with_aux(
          prm, bt, decoder_params={'topk': 1, 'logit_callback_fn': _no_eos}
      )[0]

    partitioner = partitioning.PjitPartitioner(num_partitions=1)
    self.fn = partitioner.partition(
        predict,
        in_axis_resources=None,
        out_axis_resources=None,
        compiler_options=xla_options.inference_compiler_options(model),
    )
    t0 = time.perf_counter()
    tokens = np.asarray(jax.device_get(self.fn(self.params, self.batch)))
    self.res.update(
        {
            'first_call_s': time.perf_counter() - t0,
            'tokens': tokens.tolist(),
            'batch': int(enc.shape[0]),
            'new_tokens': n,
        }
    )
    return {}

  def rep(self) -> dict:
    t = common.timed(lambda: self.jax.block_until_ready(self.fn(self.params, self.batch)), 1)[0]
    self.res['times_s'].append(t)
    return {'s': t}

  def finish(self) -> dict:
    b, n = self.res['batch'], self.res['new_tokens']
    self.res['tokens_per_s'] = [b * n / t for t in self.res['times_s']]
    self.res['peak_rss_mb'] = common.peak_rss_mb()
    return self.res


SECTIONS = {
    'train': TrainBench,
    'serve': ServeBench,
    'decode': DecodeBench,
    'dots': DotsBench,
    **{f'realistic_{d}': (lambda a, s, d=d: RealisticBench(a, s, d)) for d in common.DISTRIBUTIONS},
}


def gin_bindings(environ=None) -> list:
  """The gin bindings `PROMPT_TUNING_BENCH_GIN` asks ours' workers for (one per line)."""
  text = (os.environ if environ is None else environ).get(common.OURS_GIN_ENV, '')
  return [line.strip() for line in text.splitlines() if line.strip()]


def apply_gin_bindings(bindings) -> None:
  """Parses `bindings` once the runtime's compiler-option configurables (`xla_options`) exist."""
  if not bindings:
    return
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top,unused-import

  gin.parse_config(bindings)


def _meta(args) -> dict:
  meta = {'remat': args.remat, 'dots': args.dots, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
  meta['gin_bindings'] = gin_bindings()
  meta['glibc_tunables'] = os.environ.get('GLIBC_TUNABLES', '')  # launch.tune_malloc's restart
  meta['ld_preload'] = os.environ.get('LD_PRELOAD', '')  # PROMPT_TUNING_MALLOC=tcmalloc
  if 'jax' in sys.modules:
    jax = sys.modules['jax']
    meta.update({'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind})
    from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top

    meta['inference_compiler_options'] = xla_options.inference_compiler_options(dtype=args.dtype)
  return meta


def main(argv=None):
  parser = common.worker_parser(__doc__, SECTIONS)
  parser.add_argument(
      '--remat', default=None, help='T5Config.remat for the backbone (default: as loaded, no remat)'
  )
  parser.add_argument(
      '--compilation-cache',
      default=None,
      help='persistent XLA compilation cache dir (re-compiling the step for '
      'cost_analysis then hits the cache)',
  )
  parser.add_argument(
      '--dots',
      default='default',
      choices=('default', 'plain'),
      help="plain: the dense layers' bfloat16 matmuls emit bfloat16 (lax.dot_general) instead of "
      'accumulating in float32 (layers.dense_dot), as before that change',
  )
  args, _ = parser.parse_known_args(argv)
  if args.dots == 'plain':
    from prompt_tuning.architectures import layers  # pylint: disable=g-import-not-at-top

    layers._LOW_PRECISION = ()  # pylint: disable=protected-access
  apply_gin_bindings(gin_bindings())
  common.worker_main(parser, argv, SECTIONS, 'ours', _meta)


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.tune_malloc()  # as the entry points (PROMPT_TUNING_MALLOC set: one restart)
  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  main()
