"""Benchmark worker for Hugging Face PEFT prompt tuning (PyTorch). One section per process.

    python -m benchmarks.bench_peft --section train --shapes full --workdir W --prompt-length 20 \
        --out W/peft_train_20.json

Sections:
  prepare  builds the random transformers `T5ForConditionalGeneration` (seeded) and saves it to
           `W/hf_t5` (both frameworks load these weights).
  train    `PromptTuningConfig(num_transformer_submodules=1)`, `transformers.optimization.Adafactor`
           on the prompt embedding only (Lester et al.'s constant lr 0.3, no relative step, no
           parameter scaling), forward with labels (mean token cross entropy), backward, step.
  serve    teacher-forced scoring of the mixed-task batch: PEFT cannot mix prompt adapters in one
           batch, so 16 adapters are loaded and the batch is split per task (`set_adapter`, one
           forward per task); also the same batch as one forward with a single adapter; and
           greedy generation of `targets` label tokens, one `generate` per task.
  decode   `PeftModelForSeq2SeqLM.generate` (transformers `generate`, greedy, KV cache,
           `min_new_tokens = max_new_tokens` so exactly `decode_tokens` tokens are produced).
  realistic_{sst2,rte,boolq}
           training on the task's input-length distribution with pad-to-longest batches and
           with `group_by_length` batches (`RealisticBench`).
  dots     `torch.mm` FLOP/s at the backbone's matmul shapes, float32 and bfloat16.
"""

import gc
import os
import sys
import time

import numpy as np

from benchmarks import common


def _torch(args):
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads or os.cpu_count() or 1)
  return torch


def _device(torch):
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def _dtype(torch, name):
  return {'float32': torch.float32, 'bfloat16': torch.bfloat16}[name]


def section_prepare(args, shapes) -> dict:
  torch = _torch(args)
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(common.SEED)
  config = transformers.T5Config(**shapes.hf_config)
  model = transformers.T5ForConditionalGeneration(config)
  if model.lm_head.weight is model.shared.weight:
    # transformers 5 ties the head of a freshly built T5 even with tie_word_embeddings=False;
    # T5 1.1 checkpoints have their own head (and load untied), so give it one.
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(model.shared.weight) * config.d_model**-0.5
    )
  path = os.path.join(args.workdir, 'hf_t5')
  model.save_pretrained(path)
  n = sum(p.numel() for p in model.parameters())
  return {'path': path, 'num_params': int(n)}


def _peft_model(args, torch, prompt_length, adapters=1):
  """The PEFT model with `adapters` prompt adapters `task0..`, prompts from `common.prompt_bank`."""
  import peft  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  device = _device(torch)
  base = transformers.T5ForConditionalGeneration.from_pretrained(
      os.path.join(args.workdir, 'hf_t5'), dtype=_dtype(torch, args.dtype)
  )
  if args.dropout:
    base.config.dropout_rate = args.dropout
  cfg = peft.PromptTuningConfig(
      task_type=peft.TaskType.SEQ_2_SEQ_LM,
      num_virtual_tokens=prompt_length,
      num_transformer_submodules=1,
  )
  model = peft.get_peft_model(base, cfg, adapter_name='task0')
  for t in range(1, adapters):
    model.add_adapter(f'task{t}', cfg)
  bank = common.prompt_bank(adapters, prompt_length, base.config.d_model)
  with torch.no_grad():
    for t in range(adapters):
      emb = model.prompt_encoder[f'task{t}'].embedding
      emb.weight.copy_(torch.from_numpy(bank[t]).to(emb.weight.dtype))
  model.to(device)
  return model, device


def _matmul_peak(torch, n, reps, dtype, device) -> dict:
  a = torch.randn(n, n, dtype=dtype, device=device)
  b = torch.randn(n, n, dtype=dtype, device=device)
  sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)

  def f():
    torch.mm(a, b)
    sync()

  f()
  times = common.timed(f, reps)
  return {'n': n, 'times_s': times, 'flops_per_s': common.matmul_flops(n) / common.median(times)}


class TrainBench:
  """PEFT prompt tuning: forward with labels, backward, Adafactor step on the prompt."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'rss_mb': {'start': common.rss_mb()}}
    self.times, self.losses, self.matmul_times = [], [], []

  def setup(self) -> dict:
    args, shapes, res = self.args, self.shapes, self.res
    t_setup = time.perf_counter()
    torch = self.torch = _torch(args)
    import peft  # pylint: disable=g-import-not-at-top,unused-import
    from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top

    res['rss_mb']['imports'] = common.rss_mb()
    model, device = _peft_model(args, torch, args.prompt_length)
    model.train()
    self.model = model
    res['rss_mb']['loaded'] = common.rss_mb()
    trainable = [p for p in model.parameters() if p.requires_grad]
    res['params'] = {
        'trainable': int(sum(p.numel() for p in trainable)),
        'frozen': int(sum(p.numel() for p in model.parameters() if not p.requires_grad)),
    }
    # Lester et al. with transformers' Adafactor: constant lr 0.3, decay -0.8, clip 1.0.
    self.opt = Adafactor(
        trainable,
        lr=0.3,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
        decay_rate=-0.8,
        clip_threshold=1.0,
        weight_decay=1e-5,
    )
    self.batches = []
    for b in common.train_batches(shapes):
      enc = torch.from_numpy(b['encoder_input_tokens']).long().to(device)
      self.batches.append(
          {
              'input_ids': enc,
              'attention_mask': torch.ones_like(enc),
              'labels': torch.from_numpy(b['decoder_target_tokens']).long().to(device),
          }
      )
    self.sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    self.matmul = lambda: _matmul_peak(
        torch, shapes.matmul_size, shapes.matmul_reps, _dtype(torch, args.dtype), device
    )
    self.matmul()  # warm up
    t0 = time.perf_counter()
    self._run(1)
    res['first_step_s'] = time.perf_counter() - t0
    res['first_loss'] = self.losses[0]
    res['setup_s'] = time.perf_counter() - t_setup
    return {'setup_s': res['setup_s']}

  def _run(self, n):
    for i in range(n):
      b = self.batches[i % len(self.batches)]
      out = self.model(**b)
      out.loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    self.losses.append(float(out.loss.detach()))
    self.sync()

  def rep(self) -> dict:
    t0 = time.perf_counter()
    self._run(self.shapes.train_steps)
    dt = time.perf_counter() - t0
    self.times.append(dt)
    self.matmul_times += self.matmul()['times_s']
    return {'s': dt}

  def finish(self) -> dict:
    res, shapes = self.res, self.shapes
    step_times = [t / shapes.train_steps for t in self.times]
    res.update(
        {
            'rep_times_s': self.times,
            'steps_per_rep': shapes.train_steps,
            'batch': shapes.batch,
            'step_times_s': step_times,
            'examples_per_s': [shapes.batch / t for t in step_times],
            'last_loss': self.losses[-1],
            'matmul': {'n': shapes.matmul_size, 'times_s': self.matmul_times},
            'matmul_flops_per_s': (
                common.matmul_flops(shapes.matmul_size) / common.median(self.matmul_times)
            ),
            'peak_rss_mb': common.peak_rss_mb(),
            'memory_map_mb': common.memory_map(),  # between steps, after the timed ones
        }
    )
    return res


class RealisticBench:
  """PEFT training on realistic input lengths: `longest` = consecutive batches padded to their
  longest example (`DataCollatorForSeq2Seq(padding=True)`, what `Trainer` does by default);
  `grouped` = `TrainingArguments(group_by_length=True)`'s order (transformers'
  `get_length_grouped_indices`: megabatches of 50 batches sorted by length), padded to the longest.
  Labels are padded with -100. Timed on a stratified sample of each variant's batches."""

  def __init__(self, args, shapes, dist):
    self.args, self.shapes, self.dist = args, shapes, common.DISTRIBUTIONS[dist]
    self.res = {'distribution': dist}

  def setup(self) -> dict:
    args, shapes, res, dist = self.args, self.shapes, self.res, self.dist
    torch = self.torch = _torch(args)
    from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
    from transformers.trainer_pt_utils import get_length_grouped_indices  # pylint: disable=g-import-not-at-top

    t0 = time.perf_counter()
    model, device = _peft_model(args, torch, args.prompt_length)
    model.train()
    self.model, self.device = model, device
    trainable = [p for p in model.parameters() if p.requires_grad]
    self.opt = Adafactor(
        trainable,
        lr=0.3,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
        decay_rate=-0.8,
        clip_threshold=1.0,
        weight_decay=1e-5,
    )
    examples = common.realistic_examples(shapes, dist)
    lengths = [len(e['inputs']) for e in examples]
    b = shapes.batch
    grouped = get_length_grouped_indices(
        lengths, b, generator=torch.Generator().manual_seed(common.SEED)
    )
    plans = {
        'longest': common.longest_plan(examples, range(len(examples)), b),
        'grouped': common.longest_plan(examples, grouped, b),
    }
    res['padding_fraction'] = {n: common.padding_fraction(examples, pl) for n, pl in plans.items()}
    res['mean_input_tokens'] = float(np.mean(lengths))
    self.batches = {}
    for name, plan in plans.items():
      timed = common.timed_batches(plan, shapes.realistic_timed)
      res[f'{name}_timed_padding_fraction'] = common.padding_fraction(examples, timed)
      self.batches[name] = [self._collate(examples, rows) for rows, _ in timed]
    self.sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    for batches in self.batches.values():  # warm up every shape once
      self._run(batches[:1])
      self._run(batches[-1:])
    res['setup_s'] = time.perf_counter() - t0
    for name in self.batches:
      res[f'{name}_times_s'] = []
    return {'setup_s': res['setup_s']}

  def _collate(self, examples, rows):
    torch = self.torch
    n = max(len(examples[i]['inputs']) for i in rows)
    t = max(len(examples[i]['targets']) for i in rows)
    ids = np.zeros((len(rows), n), np.int64)
    labels = np.full((len(rows), t), -100, np.int64)
    for r, i in enumerate(rows):
      x, y = examples[i]['inputs'], examples[i]['targets']
      ids[r, : len(x)] = x
      labels[r, : len(y)] = y
    ids = torch.from_numpy(ids).to(self.device)
    return {
        'input_ids': ids,
        'attention_mask': (ids != 0).long(),
        'labels': torch.from_numpy(labels).to(self.device),
    }

  def _run(self, batches):
    for batch in batches:
      out = self.model(**batch)
      out.loss.backward()
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    self.sync()

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
    res['peak_rss_mb'] = common.peak_rss_mb()
    return res


class DotsBench:
  """`torch.mm` FLOP/s at the backbone's matmul shapes, float32 and bfloat16."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'shapes': [list(x) for x in common.dot_shapes(shapes)]}
    self.fns = {}

  def setup(self) -> dict:
    torch = _torch(self.args)
    rng = np.random.RandomState(0)
    for m, k, n in common.dot_shapes(self.shapes):
      a32 = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
      b32 = torch.from_numpy(rng.standard_normal((k, n)).astype(np.float32))
      for name, dtype in (('f32', torch.float32), ('bf16', torch.bfloat16)):
        a, b = a32.to(dtype), b32.to(dtype)
        torch.mm(a, b)
        key = f'{name}_{m}x{k}x{n}'
        self.fns[key] = lambda a=a, b=b: torch.mm(a, b)
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
    return self.res


def _scores(torch, logits, targets):
  logp = torch.log_softmax(logits.float(), dim=-1)
  return logp.gather(-1, targets[..., None])[..., 0].sum(-1)


class ServeBench:
  """Scoring the mixed-task batch: one forward per task (`set_adapter`), and one single-adapter
  forward of the whole batch; greedy generation of the labels, one `generate` per task."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'batch': shapes.serve_batch, 'tasks': shapes.serve_tasks}
    self.fns = {}

  def setup(self) -> dict:
    args, shapes, res = self.args, self.shapes, self.res
    torch = _torch(args)
    import numpy as np  # pylint: disable=g-import-not-at-top

    batch = common.serve_batch(shapes)
    model, device = _peft_model(args, torch, args.prompt_length, adapters=shapes.serve_tasks)
    model.eval()
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    enc = torch.from_numpy(batch['encoder_input_tokens']).long().to(device)
    dec = torch.from_numpy(batch['decoder_input_tokens']).long().to(device)
    tgt = torch.from_numpy(batch['decoder_target_tokens']).long().to(device)
    mask = torch.ones_like(enc)
    ids = batch['prompt_ids']

    def per_task():
      scores = torch.empty(enc.shape[0], device=device)
      with torch.inference_mode():
        for t in range(shapes.serve_tasks):
          rows = torch.from_numpy(np.nonzero(ids == t)[0]).to(device)
          model.set_adapter(f'task{t}')
          logits = model(
              input_ids=enc[rows], attention_mask=mask[rows], decoder_input_ids=dec[rows]
          ).logits
          scores[rows] = _scores(torch, logits, tgt[rows])
      sync()
      return scores

    def single():
      with torch.inference_mode():
        model.set_adapter('task0')
        logits = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
        scores = _scores(torch, logits, tgt)
      sync()
      return scores

    n = shapes.targets

    def per_task_generate():
      # Serving by generation: greedy decoding of the labels, one `generate` per task.
      tokens = torch.empty((enc.shape[0], n), dtype=torch.long, device=device)
      with torch.inference_mode():
        for t in range(shapes.serve_tasks):
          rows = torch.from_numpy(np.nonzero(ids == t)[0]).to(device)
          model.set_adapter(f'task{t}')
          out = model.generate(
              input_ids=enc[rows],
              attention_mask=mask[rows],
              max_new_tokens=n,
              min_new_tokens=n,
              do_sample=False,
              num_beams=1,
              use_cache=True,
          )
          tokens[rows] = out[:, 1:]  # drop the start token
      sync()
      return tokens

    for name, fn in (
        ('per_task', per_task),
        ('single', single),
        ('per_task_generate', per_task_generate),
    ):
      t0 = time.perf_counter()
      scores = fn()
      res[f'{name}_first_call_s'] = time.perf_counter() - t0
      key = 'tokens' if name.endswith('generate') else 'scores'
      res[f'{name}_{key}'] = (
          scores.float().cpu().numpy().tolist()
          if key == 'scores'
          else (scores.cpu().numpy().tolist())
      )
      res[f'{name}_times_s'] = []
      self.fns[name] = fn
    return {}

  def rep(self) -> dict:
    return common.rep_variants(self.res, self.fns)

  def finish(self) -> dict:
    return common.finish_variants(self.res, list(self.fns), self.shapes.serve_batch)


class DecodeBench:
  """`generate` (greedy, KV cache) of exactly `decode_tokens` new tokens."""

  def __init__(self, args, shapes):
    self.args, self.shapes = args, shapes
    self.res = {'times_s': []}

  def setup(self) -> dict:
    args, shapes = self.args, self.shapes
    torch = _torch(args)
    model, device = _peft_model(args, torch, args.prompt_length)
    model.eval()
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    enc = torch.from_numpy(common.decode_inputs(shapes)).long().to(device)
    mask = torch.ones_like(enc)
    n = shapes.decode_tokens

    def gen():
      with torch.inference_mode():
        out = model.generate(
            input_ids=enc,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            num_beams=1,
            use_cache=True,
        )
      sync()
      return out

    self.gen = gen
    t0 = time.perf_counter()
    out = gen()
    self.res.update(
        {
            'first_call_s': time.perf_counter() - t0,
            'tokens': out[:, 1:].cpu().numpy().tolist(),  # drop the start token
            'batch': int(enc.shape[0]),
            'new_tokens': n,
        }
    )
    return {}

  def rep(self) -> dict:
    t = common.timed(self.gen, 1)[0]
    self.res['times_s'].append(t)
    return {'s': t}

  def finish(self) -> dict:
    b, n = self.res['batch'], self.res['new_tokens']
    self.res['tokens_per_s'] = [b * n / t for t in self.res['times_s']]
    self.res['peak_rss_mb'] = common.peak_rss_mb()
    return self.res


class _OneShot:
  """`prepare`: all the work happens in `finish`."""

  def __init__(self, fn, args, shapes):
    self.fn, self.args, self.shapes = fn, args, shapes

  def setup(self):
    return {}

  def rep(self):
    return {}

  def finish(self):
    return self.fn(self.args, self.shapes)


SECTIONS = {
    'train': TrainBench,
    'serve': ServeBench,
    'decode': DecodeBench,
    'prepare': lambda a, s: _OneShot(section_prepare, a, s),
    'dots': DotsBench,
    **{f'realistic_{d}': (lambda a, s, d=d: RealisticBench(a, s, d)) for d in common.DISTRIBUTIONS},
}


def _meta(args) -> dict:
  del args
  gc.collect()
  meta = {
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
  }
  if 'torch' in sys.modules:
    torch = sys.modules['torch']
    meta.update(
        {
            'torch_threads': torch.get_num_threads(),
            'device': 'cuda' if torch.cuda.is_available() else 'cpu',
        }
    )
  return meta


def main(argv=None):
  parser = common.worker_parser(__doc__, SECTIONS)
  parser.add_argument(
      '--threads', type=int, default=None, help='torch.set_num_threads (default: all cores)'
  )
  common.worker_main(parser, argv, SECTIONS, 'peft', _meta)


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()  # the shutdown's garbage collection: 1.5 s of walking module graphs
  main()
