"""The methods table: each method's training speed and peak memory beside Hugging Face PEFT's.

    python -m benchmarks.bench_methods [--shapes full|quick] [--methods prompt,lora,...] \\
        [--workdir benchmarks/_work/methods]

For every method, one worker process per framework (so each peak RSS is that method's alone) runs
the method's training step on the same synthetic batches (`common.train_batches`, T5 1.1 small
shape for `full`: batch 8, 128 inputs, 8 targets, float32 on CPU): ours is the runtime's train
step as `Trainer` compiles it (one jitted `trainer.train_with_lr`, or `trainer.SplitTrainStep`
where `training_forward_compiler_options` asks for it; T5X Adafactor over the method's parameters
only); PEFT's is
forward with labels, backward and transformers' Adafactor over PEFT's trainable parameters. The
workers alternate method by method in one run. Written: `<workdir>/methods.json` (every time) and
`<workdir>/methods.md` (the table, examples/s and peak RSS per framework and their ratios).

Configurations are PEFT's for the methods PEFT has: prompt tuning (100 tokens, encoder only:
`num_transformer_submodules=1`), P-tuning (MLP, 20 tokens, hidden = d_model, encoder only),
prefix tuning (10 tokens, PEFT's T5 placement: decoder self-attention, no projection), IA3
(k, v, wo), LoRA (r 8 on q and v). Methods PEFT does not have (per-layer, residual, DePT, deep
prompts on every attention) are measured for ours alone.

PEFT's prefix tuning sizes its key/value prefixes as `num_heads x d_model / num_heads`, which
fails on the T5 1.1 small shape (6 heads x 64 = 384 != 512); the prefix row of both frameworks is
therefore measured with `num_heads = d_model / d_kv` (8 heads of 64), and the table says so.

Background load flatters ours (PyTorch loses more to it than XLA), so the run is guarded like
`benchmarks.run` (`benchmarks/load_guard.py`): it waits for a quiet machine and refuses to start on
a busy one (`--allow-load` overrides); every worker records the load and the busiest other
processes before and after it, and what other processes used while it ran; a worker that ran
beside more than `--max-interference` cores of other work is re-run (`--retries`) and otherwise
marked INVALID in the table. The CPU model and its matmul-relevant ISA flags are recorded.

Workers: `python -m benchmarks.bench_methods --worker ours|peft --method M --shapes S` print one
JSON line prefixed `RESULT`.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

from benchmarks import common
from benchmarks import load_guard

PEFT_METHODS = ('prompt', 'p_tuning', 'prefix', 'ia3', 'lora')
OURS_ONLY = ('deep_prompts', 'per_layer', 'residual', 'dept')
METHODS = PEFT_METHODS + OURS_ONLY
PROMPT_LENGTH = {
    'prompt': 100,
    'p_tuning': 20,
    'prefix': 10,
    'deep_prompts': 10,
    'per_layer': 10,
    'residual': 100,
    'dept': 40,
}


def method_shapes(method: str, shapes: common.Shapes) -> common.Shapes:
  """The shapes a method is measured at: `shapes`, except prefix tuning on a model whose heads do
  not tile `d_model` (PEFT's prefix layout needs `num_heads * d_kv == d_model`)."""
  hf = shapes.hf_config
  if method == 'prefix' and hf['num_heads'] * hf['d_kv'] != hf['d_model']:
    return dataclasses.replace(shapes, hf_config={**hf, 'num_heads': hf['d_model'] // hf['d_kv']})
  return shapes


# ------------------------------------------------------------------------------------- ours


def _our_config(hf: Dict[str, Any]):
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

  return t5.T5Config(
      vocab_size=hf['vocab_size'],
      emb_dim=hf['d_model'],
      num_heads=hf['num_heads'],
      head_dim=hf['d_kv'],
      mlp_dim=hf['d_ff'],
      num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf['num_decoder_layers'],
      mlp_activations=('gelu', 'linear'),
      logits_via_embedding=False,
      dropout_rate=0.0,
      dtype='float32',
  )


def our_module(method: str, config, inputs: int):
  """`(module, trainable regex)` of a method (the benchmark's configuration)."""
  from prompt_tuning.architectures import prompted  # pylint: disable=g-import-not-at-top
  from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top
  from prompt_tuning.methods import dept, ia3, lora, p_tuning, per_layer, prefix, residual  # pylint: disable=g-import-not-at-top,g-multiple-import

  p = PROMPT_LENGTH.get(method)
  heads = dict(num_heads=config.num_heads, head_dim=config.head_dim)
  if method == 'prompt':
    return prompted.PromptEncoderDecoder(config, prompt_length=p), '.*/prompt/.*'
  if method == 'p_tuning':
    factory = p_tuning.prompt_factory(p, 'mlp', hidden_size=config.emb_dim)
    return prompted.PromptEncoderDecoder(config, prompt_factory=factory), '.*/prompt/.*'
  if method == 'residual':
    factory = residual.prompt_factory(p, bottleneck=800)
    return prompted.PromptEncoderDecoder(config, prompt_factory=factory), '.*/prompt/.*'
  if method == 'dept':
    factory = dept.prompt_factory(p, max_length=inputs, rank=45)
    return prompted.PromptEncoderDecoder(config, prompt_factory=factory), '.*/prompt/.*'
  if method == 'per_layer':
    hooks = per_layer.PerLayerPromptHooks(length=p)
    return prompted.PromptEncoderDecoder(config, prompt_length=p, hooks=hooks), '.*/prompt/.*'
  if method == 'prefix':
    hooks = prefix.PrefixHooks(
        num_prefix=p, blocks=('self_attention',), stacks=('decoder',), **heads
    )
    return t5.EncoderDecoder(config, hooks=hooks), '.*prefix.*'
  if method == 'deep_prompts':
    return t5.EncoderDecoder(config, hooks=prefix.PrefixHooks(num_prefix=p, **heads)), '.*prefix.*'
  if method == 'ia3':
    return t5.EncoderDecoder(config, hooks=ia3.IA3Hooks()), '.*/ia3_scaling.*'
  if method == 'lora':
    return t5.EncoderDecoder(config, hooks=lora.LoraHooks(rank=8)), '.*/lora/.*'
  raise ValueError(f'Unknown method {method!r}; known: {METHODS}.')


MEMORY_NOTE = (
    'Memory: training peak RSS is the peak from the end of setting up (model, optimizer, batches; '
    'both workers first hand what setting up freed back to the system) to the end of the timed '
    "steps (Linux's `VmHWM`, reset there); the process peak (`ru_maxrss`) includes setting up, for "
    'ours a jit-compiled random initialisation of the whole model.\n\n'
)


def _start_training_peak(res: Dict[str, Any]) -> None:
  """Both workers, once the model, optimizer and batches are set up: what setting up freed goes
  back to the system (`malloc_trim`, or tcmalloc's release) and the peak RSS starts anew, so the
  table compares training's memory, not how each framework initialises random weights (ours
  jit-compiles an initializer of the whole model; a user loads a checkpoint instead)."""
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  res['setup_peak_rss_mb'] = common.peak_rss_mb()  # the reset below clears `ru_maxrss` too
  launch.release_free_memory()
  res['rss_mb']['training_start'] = common.rss_mb()
  res['training_peak_reset'] = common.reset_peak_rss()


def _end_training_peak(res: Dict[str, Any]) -> None:
  # The whole process's peak, setting up included.
  res['peak_rss_mb'] = max(common.peak_rss_mb(), res.get('setup_peak_rss_mb', 0.0))
  if res.get('training_peak_reset'):
    res['training_peak_rss_mb'] = common.peak_rss_since_reset_mb()


def run_ours(method: str, shapes: common.Shapes) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from prompt_tuning.runtime import adafactor, launch, models, optimizers, trainer  # pylint: disable=g-import-not-at-top,g-multiple-import
  from prompt_tuning.runtime import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
  from prompt_tuning.runtime import xla_options  # pylint: disable=g-import-not-at-top

  shapes = method_shapes(method, shapes)
  res = {'rss_mb': {'start': common.rss_mb()}}
  t_setup = time.perf_counter()
  config = _our_config(shapes.hf_config)
  module, regex = our_module(method, config, shapes.inputs)
  opt = optimizers.MultiOptimizer(
      (
          (
              optimizers.ModelParamTraversal(optimizers.match_any([regex])),
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
  model = models.EncoderDecoderModel(
      module,
      None,
      None,
      optimizer_def=opt,
      z_loss=0.0,
      loss_normalizing_factor='NUM_REAL_TARGET_TOKENS',
  )
  batches = common.train_batches(shapes)
  input_shapes = {k: v.shape for k, v in batches[0].items()}
  init = jax.jit(lambda r: model.get_initial_variables(r, input_shapes))
  variables = init(jax.random.PRNGKey(common.SEED))
  axes = variables['params_axes']
  opt.set_param_axes(train_state_lib.logical_axes(axes, variables['params']))
  trainable, frozen = train_state_lib.split_params(variables['params'], opt.trainable_filter)
  state = train_state_lib.TrainState(
      step=jnp.asarray(0, jnp.int32),
      trainable=trainable,
      frozen=frozen,
      opt_state=opt.init_state(trainable),
  )
  res['params'] = {
      'trainable': int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(trainable))),
      'frozen': int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(frozen))),
  }
  forward_options = xla_options.training_forward_compiler_options(model)
  if forward_options:
    # As `Trainer` runs it when asked to: forward on Eigen dots, backward on XLA's default.
    forward, backward = trainer.split_train_step_fns(model, lambda _: 0.3)
    step = trainer.SplitTrainStep(
        jax.jit(forward, compiler_options=forward_options),
        jax.jit(backward, donate_argnums=(0,)),
    )
  else:
    step = jax.jit(
        lambda st, b, _: trainer.train_with_lr(st, b, 0.3, None, model), donate_argnums=(0,)
    )
  base_rng = None  # no dropout
  res['split_step'] = bool(forward_options)
  res['rss_mb']['loaded'] = common.rss_mb()
  _start_training_peak(res)
  # As `Trainer.train`: compiled ahead of the first call, what compiling freed handed back before
  # the step's temporaries are allocated, and again after the first step.
  if isinstance(step, trainer.SplitTrainStep):
    step.compile(state, batches[0], base_rng)
  else:
    step.lower(state, batches[0], base_rng).compile()
  launch.release_free_memory()
  state, metrics = step(state, batches[0], base_rng)
  trainer.wait_for_step(state)
  launch.release_free_memory()
  res['first_loss'] = float(metrics['loss'])
  res['setup_s'] = time.perf_counter() - t_setup
  wait = res['wait_for_each_step'] = trainer.wait_for_each_step_by_default()
  times = []
  for _ in range(shapes.train_reps):
    t0 = time.perf_counter()
    for i in range(shapes.train_steps):
      state, metrics = step(state, batches[i % len(batches)], base_rng)
      if wait:  # as `Trainer.train` by default (under tcmalloc on the CPU)
        trainer.wait_for_step(state)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / shapes.train_steps)
  res['step_times_s'] = times
  res['examples_per_s'] = shapes.batch / common.median(times)
  _end_training_peak(res)
  return res


# ------------------------------------------------------------------------------------- PEFT


def _peft_config(method: str, hf: Dict[str, Any]):
  import peft  # pylint: disable=g-import-not-at-top

  task = peft.TaskType.SEQ_2_SEQ_LM
  p = PROMPT_LENGTH.get(method)
  if method == 'prompt':
    return peft.PromptTuningConfig(
        task_type=task, num_virtual_tokens=p, num_transformer_submodules=1
    )
  if method == 'p_tuning':
    return peft.PromptEncoderConfig(
        task_type=task,
        num_virtual_tokens=p,
        encoder_hidden_size=hf['d_model'],
        num_transformer_submodules=1,
    )
  if method == 'prefix':
    return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=p)
  if method == 'ia3':
    return peft.IA3Config(task_type=task)
  if method == 'lora':
    return peft.LoraConfig(task_type=task, r=8, lora_alpha=8)
  raise ValueError(f'PEFT has no {method!r} (methods with a PEFT equivalent: {PEFT_METHODS}).')


def run_peft(method: str, shapes: common.Shapes) -> Dict[str, Any]:
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top

  shapes = method_shapes(method, shapes)
  res = {'rss_mb': {'start': common.rss_mb()}}
  t_setup = time.perf_counter()
  torch.manual_seed(common.SEED)
  config = transformers.T5Config(**shapes.hf_config)
  base = transformers.T5ForConditionalGeneration(config)
  if base.lm_head.weight is base.shared.weight:  # T5 1.1 has its own head (see bench_peft.py)
    base.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(base.shared.weight) * config.d_model**-0.5
    )
  model = peft.get_peft_model(base, _peft_config(method, shapes.hf_config))
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  res['params'] = {
      'trainable': int(sum(p.numel() for p in trainable)),
      'frozen': int(sum(p.numel() for p in model.parameters() if not p.requires_grad)),
  }
  opt = Adafactor(
      trainable,
      lr=0.3,
      relative_step=False,
      scale_parameter=False,
      warmup_init=False,
      decay_rate=-0.8,
      clip_threshold=1.0,
      weight_decay=1e-5,
  )
  batches = []
  for b in common.train_batches(shapes):
    enc = torch.from_numpy(b['encoder_input_tokens']).long()
    batches.append(
        {
            'input_ids': enc,
            'attention_mask': torch.ones_like(enc),
            'labels': torch.from_numpy(b['decoder_target_tokens']).long(),
        }
    )
  res['rss_mb']['loaded'] = common.rss_mb()
  _start_training_peak(res)

  def run(n):
    for i in range(n):
      out = model(**batches[i % len(batches)])
      out.loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    return float(out.loss.detach())

  res['first_loss'] = run(1)
  res['setup_s'] = time.perf_counter() - t_setup
  times = []
  for _ in range(shapes.train_reps):
    t0 = time.perf_counter()
    run(shapes.train_steps)
    times.append((time.perf_counter() - t0) / shapes.train_steps)
  res['step_times_s'] = times
  res['examples_per_s'] = shapes.batch / common.median(times)
  _end_training_peak(res)
  return res


# ------------------------------------------------------------------------------ orchestration


def _worker(
    framework: str, method: str, shapes: str, timeout: float, max_interference: float
) -> Dict[str, Any]:
  """Runs one worker process under a load guard; the result carries its `load` record."""
  cmd = [
      sys.executable,
      '-m',
      'benchmarks.bench_methods',
      '--worker',
      framework,
      '--method',
      method,
      '--shapes',
      shapes,
  ]
  env = dict(
      os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu')
  )
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  guard = load_guard.Section([os.getpid()], max_interference)
  guard.before()
  t0 = time.time()
  start = last = load_guard.Snapshot()
  with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=err, text=True)
    # The interference is measured up to the last moment the worker was seen alive: a snapshot
    # after it exits no longer lists it, and its CPU time would count as another process's.
    while proc.poll() is None:
      if time.time() - t0 > timeout:
        proc.kill()
        proc.wait()
        break
      last = load_guard.Snapshot()
      time.sleep(1.0)
    guard.rec['during'] = load_guard.interference(start, last, guard.own_roots)
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
  guard.after()
  load = guard.record()
  lines = [l for l in stdout.splitlines() if l.startswith('RESULT')]
  if proc.returncode != 0 or not lines:
    return {'error': (stderr or stdout)[-2000:], 'wall_s': time.time() - t0, 'load': load}
  out = json.loads(lines[-1][len('RESULT') :])
  out['wall_s'] = time.time() - t0
  out['load'] = load
  return out


def _fmt(x, spec):
  return '—' if x is None else format(x, spec)


def _training_peak(worker: Any) -> Optional[float]:
  if not isinstance(worker, dict) or 'error' in worker:
    return None
  return worker.get('training_peak_rss_mb')


def table(results: Dict[str, Dict[str, Any]]) -> str:
  """The markdown table of `results[method][framework]`."""
  rows = [
      '| method | trainable params (ours / PEFT) | examples/s ours | examples/s PEFT | speed ours/PEFT '
      '| training peak RSS MiB ours | training peak RSS MiB PEFT | memory ours/PEFT '
      '| process peak RSS MiB ours / PEFT |',
      '|---|---|---|---|---|---|---|---|---|',
  ]
  order = lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m)
  for method in sorted(results, key=order):  # methods.json keeps its keys sorted
    r = results[method]
    ours, theirs = r.get('ours', {}), r.get('peft', {})
    get = lambda d, k: None if 'error' in d or k not in d else d[k]
    invalid = [
        f
        for f, d in (('ours', ours), ('PEFT', theirs))
        if (d.get('load') or {}).get('valid') is False
    ]
    label = method + (f' ({r["shape_note"]})' if r.get('shape_note') else '')
    label += f' **INVALID ({", ".join(invalid)} loaded)**' if invalid else ''
    eo, ep = get(ours, 'examples_per_s'), get(theirs, 'examples_per_s')
    # Training's peak where the worker measured it, else (older results) the process's; a ratio
    # only of two peaks of the same kind.
    wo, wp = get(ours, 'peak_rss_mb'), get(theirs, 'peak_rss_mb')
    to, tp = _training_peak(ours), _training_peak(theirs)
    if wp is not None and (to is None) != (tp is None):
      mo, mp = wo, wp
    else:
      mo, mp = to or wo, tp or wp
    po = get(ours, 'params') and ours['params']['trainable']
    pp = get(theirs, 'params') and theirs['params']['trainable']
    rows.append(
        f'| {label} | {_fmt(po, ",")} / {_fmt(pp, ",")} | {_fmt(eo, ".2f")} | {_fmt(ep, ".2f")} '
        f'| {_fmt(eo / ep if eo and ep else None, ".2f")} | {_fmt(mo, ".0f")} | {_fmt(mp, ".0f")} '
        f'| {_fmt(mo / mp if mo and mp else None, ".2f")} '
        f'| {_fmt(wo, ".0f")} / {_fmt(wp, ".0f")} |'
    )
  return '\n'.join(rows)


def allocator() -> str:
  """This worker's allocator settings (`launch.tune_malloc`'s restart sets them for ours)."""
  return common.describe_allocator(
      os.environ.get('GLIBC_TUNABLES', ''), os.environ.get('LD_PRELOAD', '')
  )


def allocator_line(results: Dict[str, Dict[str, Any]]) -> str:
  """'Allocator: ...' for the report, from what each framework's workers recorded."""
  said = {}
  for by_framework in results.values():
    for framework, r in by_framework.items():
      if isinstance(r, dict) and r.get('allocator'):
        said.setdefault(framework, [])
        if r['allocator'] not in said[framework]:
          said[framework].append(r['allocator'])
  if not said:
    return ''
  return (
      f"Allocator: ours' workers ran with {', '.join(said.get('ours', ['not recorded']))} "
      f"(`PROMPT_TUNING_MALLOC`), PEFT's with {', '.join(said.get('peft', ['not recorded']))}."
      '\n\n'
  )


def render(raw: Dict[str, Any], shapes_name: str, max_interference: float) -> str:
  """The report (`methods.md`) from the run's `methods.json` contents."""
  meta, results = raw['meta'], raw['results']
  shapes = common.SHAPES[shapes_name]
  cpu = meta['cpu_info']
  loaded = sorted(
      f'{m} {f}'
      for m, r in results.items()
      for f, d in r.items()
      if isinstance(d, dict) and (d.get('load') or {}).get('valid') is False
  )
  return (
      f'Methods, {shapes_name} shapes ({shapes.hf_config["d_model"]}d, '
      f'{shapes.hf_config["num_layers"]}+{shapes.hf_config["num_decoder_layers"]} layers, batch '
      f'{shapes.batch}, {shapes.inputs} inputs, {shapes.targets} targets), one run on '
      f'{cpu.get("model", "unknown CPU")} ({cpu.get("logical_cpus")} logical CPUs; '
      f'{" ".join(cpu.get("isa", []))}); load average {meta["load_avg_start"]} -> '
      f'{meta["load_avg_end"]}; tolerance {max_interference:.2f} cores of other work per '
      'worker.\n\n'
      + (
          f'**INVALID rows (ran beside other work): {", ".join(loaded)}.**\n\n'
          if loaded
          else 'Every worker ran on a quiet machine (valid).\n\n'
      )
      + allocator_line(results)
      + (
          MEMORY_NOTE
          if any(_training_peak(d) for r in results.values() for d in r.values())
          else ''
      )
      + table(results)
      + '\n'
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', default='full', choices=sorted(common.SHAPES))
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--workdir', default=os.path.join('benchmarks', '_work', 'methods'))
  parser.add_argument('--timeout', type=float, default=1800.0)
  parser.add_argument('--worker', choices=('ours', 'peft'), default=None)
  parser.add_argument('--method', default=None)
  parser.add_argument(
      '--render-only',
      action='store_true',
      help="rewrite the workdir's methods.md from its methods.json (no measurement)",
  )
  load_guard.add_arguments(parser)
  args = parser.parse_args(argv)
  shapes = common.SHAPES[args.shapes]
  if args.render_only:
    with open(os.path.join(args.workdir, 'methods.json')) as f:
      raw = json.load(f)
    meta = raw['meta']
    text = render(
        raw,
        meta.get('shapes', args.shapes),
        meta.get('max_interference_cores', args.max_interference),
    )
    with open(os.path.join(args.workdir, 'methods.md'), 'w') as f:
      f.write(text)
    print(text)
    return 0
  if args.worker:
    run = run_ours if args.worker == 'ours' else run_peft
    res = run(args.method, shapes)
    res['allocator'] = allocator()
    print('RESULT' + json.dumps(res, default=float), flush=True)
    return 0
  methods = [m for m in args.methods.split(',') if m]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f'unknown methods {unknown}; choose from {",".join(METHODS)}')
  quiet = load_guard.refuse_if_busy(args)
  if quiet is None:
    return 2
  os.makedirs(args.workdir, exist_ok=True)
  results: Dict[str, Dict[str, Any]] = {}
  meta = {
      'shapes': args.shapes,
      'cpu_info': load_guard.cpu_info(),
      'load_avg_start': common.load_avg(),
      'quiet_at_start': quiet,
      'max_interference_cores': args.max_interference,
      'time': time.time(),
  }
  for method in methods:
    results[method] = {}
    measured = method_shapes(method, shapes)
    if measured is not shapes:
      results[method][
          'shape_note'
      ] = f'{measured.hf_config["num_heads"]} heads of {measured.hf_config["d_kv"]}, for PEFT'
    frameworks: List[str] = ['ours', 'peft'] if method in PEFT_METHODS else ['ours']
    for framework in frameworks:
      for attempt in range(args.retries + 1):
        r = _worker(framework, method, args.shapes, args.timeout, args.max_interference)
        r['attempt'] = attempt
        if r['load'].get('valid') is not False:
          break
        print(f'[bench_methods] {method} {framework}: {r["load"]["verdict"]}; again', flush=True)
        load_guard.wait_for_quiet(args.max_interference, args.wait_quiet)
      results[method][framework] = r
      r['load_avg'] = common.load_avg()
      status = (
          r.get('error', '').splitlines()[-1:]
          if 'error' in r
          else f'{r["examples_per_s"]:.2f} ex/s ({r["load"]["verdict"]})'
      )
      print(f'[bench_methods] {method} {framework}: {status}', flush=True)
      common.write_json(
          os.path.join(args.workdir, 'methods.json'), {'meta': meta, 'results': results}
      )
  meta['load_avg_end'] = common.load_avg()
  common.write_json(os.path.join(args.workdir, 'methods.json'), {'meta': meta, 'results': results})
  text = render({'meta': meta, 'results': results}, args.shapes, args.max_interference)
  with open(os.path.join(args.workdir, 'methods.md'), 'w') as f:
    f.write(text)
  print(text)
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  if '--worker=ours' in sys.argv or ' '.join(sys.argv).find('--worker ours') >= 0:
    launch.tune_malloc()  # as the entry points (the PEFT worker runs as PyTorch users do)
  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  sys.exit(main())
