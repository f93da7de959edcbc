"""Shapes, synthetic data, timing and memory helpers shared by the benchmark workers.

Both workers (`bench_ours.py`, `bench_peft.py`) build their inputs from the same seeds through these
functions, so they see identical token ids and identical prompt values.
"""

import collections
import ctypes
import dataclasses
import json
import os
import re
import resource
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

SEED = 0
PROMPT_SEED = 1
EOS_ID = 1
# Gin bindings for ours' workers, one per line (`benchmarks.run --ours-gin`, `bench_ours`).
OURS_GIN_ENV = 'PROMPT_TUNING_BENCH_GIN'


@dataclasses.dataclass(frozen=True)
class Shapes:
  """One benchmark size: the model (as transformers `T5Config` kwargs) and the workloads."""

  name: str
  hf_config: Dict[str, Any]
  batch: int  # training batch
  inputs: int  # encoder input length (before the prompt)
  targets: int  # decoder target length
  prompt_lengths: Sequence[int]
  train_steps: int  # steps per timed repetition
  train_reps: int  # timed repetitions per worker process
  serve_batch: int  # mixed-task serving batch
  serve_tasks: int  # tasks (prompts) in that batch
  serve_reps: int
  decode_batch: int
  decode_tokens: int
  decode_reps: int
  serve_prompt_lengths: Sequence[int] = (100,)  # the gin default PROMPT_LENGTH
  decode_prompt_lengths: Sequence[int] = (100,)
  matmul_size: int = 2048
  matmul_reps: int = 5  # matmul timings after every repetition
  num_train_batches: int = 4  # distinct host batches cycled through
  # Realistic-length training (issue 18): every variant batches the same stream of
  # `realistic_stream` examples its own way; a repetition times `realistic_timed` of its batches,
  # picked evenly over its batches sorted by padded length (`realistic_timed_fixed` for fixed
  # padding, whose batches all have one shape). Then the padded input length (the paper's
  # TASK_FEATURE_LENGTHS), the targets' padded length, the prompt length and the repetitions.
  realistic_stream: int = 4096
  realistic_timed: int = 16
  realistic_timed_fixed: int = 4
  realistic_max_inputs: int = 512
  realistic_targets: int = 8
  realistic_prompt: int = 100
  realistic_reps: int = 3
  # bfloat16 section: repetitions of the matmul microbenchmark; its (M, K, N) shapes are the T5
  # shapes of `shapes` (see `dot_shapes`).
  dots_reps: int = 5


def _t5_1_1(d_model, d_ff, layers, heads, vocab=32128, d_kv=64) -> Dict[str, Any]:
  return dict(
      vocab_size=vocab,
      d_model=d_model,
      d_kv=d_kv,
      d_ff=d_ff,
      num_layers=layers,
      num_decoder_layers=layers,
      num_heads=heads,
      feed_forward_proj='gated-gelu',
      tie_word_embeddings=False,
      dropout_rate=0.0,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      layer_norm_epsilon=1e-6,
      pad_token_id=0,
      eos_token_id=EOS_ID,
      decoder_start_token_id=0,
  )


SHAPES = {
    # The CPU setting: T5 1.1 small shape, batch 8, inputs 128, targets 8.
    'full': Shapes(
        name='full',
        hf_config=_t5_1_1(512, 1024, 8, 6),
        batch=8,
        inputs=128,
        targets=8,
        prompt_lengths=(20, 100),
        train_steps=3,
        train_reps=5,
        serve_batch=32,
        serve_tasks=16,
        serve_reps=5,
        decode_batch=8,
        decode_tokens=32,
        decode_reps=5,
    ),
    # Smoke-test size (< 1 minute end to end).
    'quick': Shapes(
        name='quick',
        hf_config=_t5_1_1(64, 128, 2, 4, vocab=512, d_kv=16),
        batch=4,
        inputs=16,
        targets=4,
        prompt_lengths=(4, 8),
        train_steps=2,
        train_reps=1,
        serve_batch=8,
        serve_tasks=4,
        serve_reps=1,
        decode_batch=4,
        decode_tokens=4,
        decode_reps=1,
        serve_prompt_lengths=(4,),
        decode_prompt_lengths=(4,),
        matmul_size=256,
        matmul_reps=3,
        realistic_stream=256,
        realistic_timed=4,
        realistic_timed_fixed=2,
        realistic_max_inputs=64,
        realistic_targets=4,
        realistic_prompt=4,
        realistic_reps=1,
        dots_reps=1,
    ),
    # GPU section (only run when JAX sees a GPU): the same workloads on T5 1.1 base and large with
    # bfloat16 activations (the dtype is chosen by the workers' --dtype).
    'gpu_base': Shapes(
        name='gpu_base',
        hf_config=_t5_1_1(768, 2048, 12, 12),
        batch=8,
        inputs=128,
        targets=8,
        prompt_lengths=(20, 100),
        train_steps=10,
        train_reps=5,
        serve_batch=32,
        serve_tasks=16,
        serve_reps=5,
        decode_batch=8,
        decode_tokens=32,
        decode_reps=5,
        matmul_size=8192,
    ),
    'gpu_large': Shapes(
        name='gpu_large',
        hf_config=_t5_1_1(1024, 2816, 24, 16),
        batch=8,
        inputs=128,
        targets=8,
        prompt_lengths=(20, 100),
        train_steps=10,
        train_reps=5,
        serve_batch=32,
        serve_tasks=16,
        serve_reps=5,
        decode_batch=8,
        decode_tokens=32,
        decode_reps=5,
        matmul_size=8192,
    ),
    # Runs the GPU-section code path on CPU with tiny shapes (tests it without a GPU).
    'gpu_tiny': Shapes(
        name='gpu_tiny',
        hf_config=_t5_1_1(64, 128, 2, 4, vocab=512, d_kv=16),
        batch=4,
        inputs=16,
        targets=4,
        prompt_lengths=(4,),
        train_steps=2,
        train_reps=1,
        serve_batch=8,
        serve_tasks=4,
        serve_reps=1,
        decode_batch=4,
        decode_tokens=4,
        decode_reps=1,
        serve_prompt_lengths=(4,),
        decode_prompt_lengths=(4,),
        matmul_size=256,
        matmul_reps=3,
    ),
}


# ------------------------------------------------------------------------------------- data


def _tokens(rng: np.random.RandomState, shape, vocab: int) -> np.ndarray:
  # Ids 0 (pad) and 1 (EOS) are avoided, so every position is real and nothing stops early.
  return rng.randint(2, vocab, size=shape).astype(np.int32)


def shift_right(targets: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def train_batches(shapes: Shapes) -> List[Dict[str, np.ndarray]]:
  """`num_train_batches` host (numpy) batches in the EncDecFeatureConverter layout."""
  rng = np.random.RandomState(SEED)
  vocab = shapes.hf_config['vocab_size']
  out = []
  for _ in range(shapes.num_train_batches):
    enc = _tokens(rng, (shapes.batch, shapes.inputs), vocab)
    tgt = _tokens(rng, (shapes.batch, shapes.targets), vocab)
    out.append(
        {
            'encoder_input_tokens': enc,
            'decoder_input_tokens': shift_right(tgt),
            'decoder_target_tokens': tgt,
            'decoder_loss_weights': np.ones_like(tgt, dtype=np.float32),
        }
    )
  return out


def serve_batch(shapes: Shapes) -> Dict[str, np.ndarray]:
  """`serve_batch` examples; example i belongs to task `prompt_ids[i]` (shuffled, equal counts)."""
  rng = np.random.RandomState(SEED + 1)
  vocab = shapes.hf_config['vocab_size']
  n, t = shapes.serve_batch, shapes.serve_tasks
  if n % t:
    raise ValueError(f'serve_batch {n} must be a multiple of serve_tasks {t}.')
  enc = _tokens(rng, (n, shapes.inputs), vocab)
  tgt = _tokens(rng, (n, shapes.targets), vocab)
  ids = rng.permutation(np.repeat(np.arange(t), n // t)).astype(np.int32)
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': shift_right(tgt),
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': np.ones_like(tgt, np.float32),
      'prompt_ids': ids,
  }


def decode_inputs(shapes: Shapes) -> np.ndarray:
  rng = np.random.RandomState(SEED + 2)
  return _tokens(rng, (shapes.decode_batch, shapes.inputs), shapes.hf_config['vocab_size'])


def prompt_bank(num: int, length: int, dim: int) -> np.ndarray:
  """`[num, length, dim]` float32 prompts, U[-0.5, 0.5) (Lester et al.'s random init)."""
  rng = np.random.RandomState(PROMPT_SEED)
  return rng.uniform(-0.5, 0.5, size=(num, length, dim)).astype(np.float32)


# ----------------------------------------------------------------------- realistic lengths


@dataclasses.dataclass(frozen=True)
class LengthDist:
  """A task's input-length distribution in T5 SentencePiece tokens of the `inputs` feature (the
  task's text template included, EOS included), modelled as a log-normal through `median` and
  `p95`, clipped to `[shortest, longest]` (then truncated to the padded length, as seqio does)."""

  name: str
  median: float
  p95: float
  shortest: int
  longest: int
  targets: int  # target tokens with EOS (the label words)
  basis: str  # where the numbers come from


# Estimates, not measurements: nothing is downloaded. Word counts are those published for the
# datasets (GLUE/SuperGLUE papers and dataset cards); they are converted at about 1.3 T5
# SentencePiece tokens per English word, plus the tokens of the T5 text template and EOS.
DISTRIBUTIONS = {
    'sst2': LengthDist(
        'SST-2',
        median=13,
        p95=36,
        shortest=4,
        longest=75,
        targets=2,
        basis=(
            'GLUE SST-2 train: 67,349 movie-review phrases and sentences, about 9-10 words on '
            'average (median about 7, longest about 52 words); template `sentence:` + EOS'
        ),
    ),
    'rte': LengthDist(
        'RTE',
        median=66,
        p95=150,
        shortest=15,
        longest=290,
        targets=3,
        basis=(
            'GLUE/SuperGLUE RTE train: 2,490 premise/hypothesis pairs, premises about 43 words '
            'and hypotheses about 9 on average, a long tail of premises past 200 words; template '
            '`sentence1: ... sentence2: ...` + EOS'
        ),
    ),
    'boolq': LengthDist(
        'BoolQ',
        median=150,
        p95=330,
        shortest=30,
        longest=850,
        targets=2,
        basis=(
            'SuperGLUE BoolQ train: 9,427 questions (about 9 words) with Wikipedia passages (about '
            '108 words on average, Clark et al. 2019), the longest past 600 words, so a few '
            'percent exceed 512 tokens and are truncated; template `question: ... passage: ...` '
            '+ EOS'
        ),
    ),
}


def sample_lengths(dist: LengthDist, n: int, max_len: int, seed: int = SEED) -> np.ndarray:
  """`n` input lengths of `dist`, scaled to a padded length of `max_len` (the distributions are
  stated for 512; the quick shapes scale them down), truncated at `max_len`.

  Stratified: the lengths are the distribution's quantiles at (i + 0.5) / n in a seeded random
  order, so even a few dozen examples represent the distribution (its tail included).
  """
  from statistics import NormalDist  # pylint: disable=g-import-not-at-top

  scale = max_len / 512.0
  mu = np.log(dist.median)
  sigma = (np.log(dist.p95) - mu) / NormalDist().inv_cdf(0.95)
  q = (np.arange(n) + 0.5) / n
  z = np.array([NormalDist().inv_cdf(float(x)) for x in q])
  lengths = np.clip(np.exp(mu + sigma * z), dist.shortest, dist.longest) * scale
  lengths = np.clip(np.round(lengths), 2, max_len).astype(np.int64)
  return np.random.RandomState(seed).permutation(lengths)


def realistic_examples(shapes: Shapes, dist: LengthDist) -> List[Dict[str, np.ndarray]]:
  """The stream: `realistic_stream` unpadded examples, `inputs` (ending in EOS) and `targets`."""
  rng = np.random.RandomState(SEED + 3)
  vocab = shapes.hf_config['vocab_size']
  targets = min(dist.targets, shapes.realistic_targets)
  out = []
  for n in sample_lengths(dist, shapes.realistic_stream, shapes.realistic_max_inputs):
    inputs = np.append(_tokens(rng, (int(n) - 1,), vocab), EOS_ID).astype(np.int32)
    tgt = np.append(_tokens(rng, (targets - 1,), vocab), EOS_ID).astype(np.int32)
    out.append({'inputs': inputs, 'targets': tgt})
  return out


def bucket_lengths(shapes: Shapes, dist: LengthDist, num_buckets: int = 4) -> tuple:
  """The bucket lengths the runtime would choose (`bucketing.choose_lengths`, defaults of
  `BucketConfig`) from a 1000-example sample of `dist` (another seed than the timed examples)."""
  from prompt_tuning.data import bucketing  # pylint: disable=g-import-not-at-top

  sample = sample_lengths(dist, 1000, shapes.realistic_max_inputs, seed=SEED + 99)
  return bucketing.choose_lengths(sample, shapes.realistic_max_inputs, num_buckets, 8)


def fixed_plan(examples, batch: int, max_len: int) -> List[tuple]:
  """T5X without packing: consecutive batches, every one padded to `max_len`."""
  return [(list(range(i, i + batch)), max_len) for i in range(0, len(examples), batch)]


def bucketed_plan(examples, batch: int, lengths: Sequence[int]) -> List[tuple]:
  """`(indices, padded length)` of ours with length buckets, as the runtime's training stream.

  Examples join their bucket's queue in stream order and a full queue becomes a batch (tf.data
  `group_by_window`, `bucketing.bucket_batches`). In an endless training stream the examples still
  queued at the end would wait for later ones; on this finite list they are promoted to the next
  longer bucket (which holds them), and a last incomplete batch is filled with empty rows (counted
  as padding), so every example is trained exactly once. Both can only overstate the padding of
  bucketing.
  """
  queues: Dict[int, List[int]] = {}
  plan = []
  for i, ex in enumerate(examples):
    b = int(np.searchsorted(lengths, len(ex['inputs']), side='left'))
    queues.setdefault(b, []).append(i)
    if len(queues[b]) == batch:
      plan.append((queues.pop(b), int(lengths[b])))
  carry: List[int] = []
  for b in range(len(lengths)):
    carry += queues.pop(b, [])
    while len(carry) >= batch:
      plan.append((carry[:batch], int(lengths[b])))
      carry = carry[batch:]
  if carry:
    plan.append((carry + [None] * (batch - len(carry)), int(lengths[-1])))
  return plan


def longest_plan(examples, order: Sequence[int], batch: int) -> List[tuple]:
  """Batches of `order`'s consecutive examples, each padded to its longest (pad-to-longest)."""
  plan = []
  for i in range(0, len(order) - batch + 1, batch):
    rows = [int(j) for j in order[i : i + batch]]
    plan.append((rows, max(len(examples[j]['inputs']) for j in rows)))
  return plan


def timed_batches(plan, k: int) -> List[tuple]:
  """`k` batches of `plan` picked evenly over it sorted by padded length (a stratified sample: the
  time of these batches, scaled, estimates the time of the whole plan)."""
  ordered = sorted(plan, key=lambda item: (item[1], [-1 if i is None else i for i in item[0]]))
  return [ordered[int((i + 0.5) * len(ordered) / k)] for i in range(min(k, len(ordered)))]


def padding_fraction(examples, plan) -> float:
  """Padding share of the input positions (prompt excluded) of a plan; empty rows are padding."""
  real = sum(len(examples[i]['inputs']) for rows, _ in plan for i in rows if i is not None)
  total = sum(len(rows) * n for rows, n in plan)
  return 1.0 - real / total


def realistic_batch(examples, rows: Sequence[Optional[int]], inputs_len: int, targets_len: int):
  """A host batch in the EncDecFeatureConverter layout (`None` rows are all padding)."""
  n = len(rows)
  enc = np.zeros((n, inputs_len), np.int32)
  tgt = np.zeros((n, targets_len), np.int32)
  for r, i in enumerate(rows):
    if i is None:
      continue
    x, t = examples[i]['inputs'], examples[i]['targets']
    enc[r, : len(x)] = x
    tgt[r, : len(t)] = t
  return {
      'encoder_input_tokens': enc,
      'decoder_input_tokens': shift_right(tgt),
      'decoder_target_tokens': tgt,
      'decoder_loss_weights': (tgt > 0).astype(np.float32),
  }


def dot_shapes(shapes: Shapes) -> List[tuple]:
  """(M, K, N) of the backbone's largest matmuls in a training step at `shapes` (prompt included):
  the attention projections and the gated-GELU MLP over `batch * (P + inputs)` positions."""
  hf = shapes.hf_config
  m = shapes.batch * (max(shapes.prompt_lengths) + shapes.inputs)
  inner = hf['num_heads'] * hf['d_kv']
  return [(m, hf['d_model'], inner), (m, hf['d_model'], hf['d_ff']), (m, hf['d_ff'], hf['d_model'])]


# ------------------------------------------------------------------------------ measurement


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs)) if xs else float('nan')


def timed(fn: Callable[[], Any], reps: int) -> List[float]:
  """Wall-clock seconds of `reps` calls of `fn` (which must block until its work is done)."""
  out = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
  return out


def describe_allocator(glibc_tunables: str = '', ld_preload: str = '') -> str:
  """A worker's allocator settings in a report: a preloaded allocator replaces glibc's."""
  if ld_preload:
    return f'`LD_PRELOAD={ld_preload}`'
  if glibc_tunables:
    return f'`GLIBC_TUNABLES={glibc_tunables}`'
  return "glibc's defaults"


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (MiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
  """Starts this process's peak resident set size anew from its current RSS (Linux: `5` into
  `/proc/self/clear_refs` resets `VmHWM`, and with it this process's `ru_maxrss`, which Linux reads
  from the same high-water mark: read `peak_rss_mb` first to keep the earlier peak). False where
  the kernel does not offer it."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return peak_rss_since_reset_mb() is not None
  except OSError:
    return False


def peak_rss_since_reset_mb() -> Optional[float]:
  """Peak resident set size (MiB) since `reset_peak_rss` (`VmHWM`), None without `/proc`."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def rss_mb() -> float:
  """Current resident set size (MiB)."""
  try:
    import psutil  # pylint: disable=g-import-not-at-top

    return psutil.Process().memory_info().rss / 2**20
  except ImportError:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def rss_by_mapping_mb(smaps_path: str = '/proc/self/smaps', top: int = 8) -> Dict[str, float]:
  """Resident MiB per mapping of this process, largest first: shared libraries by file name
  (`libjax_common.so`), other files by path, `[heap]`, `[anon]` for anonymous mappings; the rest
  summed as `other`. Empty without `/proc`. The mappings sum to the RSS."""
  sizes = collections.Counter()
  name = None
  try:
    with open(smaps_path) as f:
      for line in f:
        fields = line.split()
        if not fields:
          continue
        if not fields[0].endswith(':'):  # a mapping's header: range perms offset dev inode [path]
          path = fields[5] if len(fields) > 5 else '[anon]'
          base = os.path.basename(path)
          name = base[: base.index('.so') + 3] if '.so' in base else path
        elif fields[0] == 'Rss:' and name is not None:
          sizes[name] += int(fields[1]) / 1024.0
  except OSError:
    return {}
  out = dict(sizes.most_common(top))
  rest = sum(sizes.values()) - sum(out.values())
  if rest > 0:
    out['other'] = rest
  return {k: round(v, 1) for k, v in out.items()}


# tcmalloc's statistics lines (`MALLOC: <bytes> (<MiB> MiB) <what>`) and the keys they get.
_TCMALLOC_LINES = {
    'Bytes in use by application': 'in_use',
    'Bytes in page heap freelist': 'page_heap_free',
    'Bytes in central cache freelist': 'central_cache_free',
    'Bytes in transfer cache freelist': 'transfer_cache_free',
    'Bytes in thread cache freelists': 'thread_cache_free',
    'Bytes in malloc metadata': 'metadata',
    'Actual memory used (physical + swap)': 'total',
    'Bytes released to OS (aka unmapped)': 'released',
}


def parse_tcmalloc_stats(text: str) -> Dict[str, float]:
  """MiB per kind from gperftools' `MallocExtension::GetStats` text (keys of `_TCMALLOC_LINES`)."""
  out = {}
  for line in text.splitlines():
    m = re.match(r'MALLOC:\s+[=+]?\s*(\d+)\s+\(\s*[\d.]+ MiB\)\s+(.*?)\s*$', line)
    if m and m.group(2) in _TCMALLOC_LINES:
      out[_TCMALLOC_LINES[m.group(2)]] = round(int(m.group(1)) / 2**20, 1)
  return out


def tcmalloc_stats_mb() -> Optional[Dict[str, float]]:
  """What gperftools' tcmalloc holds, in MiB (`parse_tcmalloc_stats`), where it is this process's
  allocator (preloaded: `PROMPT_TUNING_MALLOC`); None otherwise."""
  try:
    get_stats = ctypes.CDLL(None).MallocExtension_GetStats
  except (AttributeError, OSError):
    return None
  buf = ctypes.create_string_buffer(1 << 16)
  get_stats(buf, len(buf))
  return parse_tcmalloc_stats(buf.value.decode(errors='replace')) or None


def memory_map() -> Dict[str, Any]:
  """This process's resident memory now, by mapping (`rss_by_mapping_mb`) and, under tcmalloc, by
  what the allocator holds (`tcmalloc_stats_mb`): where a worker's resident base goes."""
  return {
      'rss': round(rss_mb(), 1),
      'by_mapping': rss_by_mapping_mb(),
      'tcmalloc': tcmalloc_stats_mb(),
  }


def load_avg() -> Optional[List[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=float)
  os.replace(tmp, path)


def matmul_flops(n: int) -> float:
  return 2.0 * n**3


# ------------------------------------------------------------------------- worker protocol


def parse_jobs(
    jobs: Optional[Sequence[str]], section: Optional[str], prompt_length: int
) -> List[tuple]:
  """`['train:20', 'serve:100']` (or one `--section` and `--prompt-length`) -> `[(section, P)]`."""
  if not jobs:
    if not section:
      raise SystemExit('pass --section (and --prompt-length) or one or more --job SECTION:P')
    return [(section, prompt_length)]
  out = []
  for job in jobs:
    name, _, p = job.partition(':')
    out.append((name, int(p) if p else prompt_length))
  return out


def run_worker(
    make_bench: Callable[[str, int], Any],
    jobs: Sequence[tuple],
    reply_fd: Optional[int],
    reps: Callable[[str], int],
    finish_meta: Callable[[Any], dict],
):
  """Runs benchmark jobs; each bench has `setup()`, `rep()` and `finish()`.

  Without `reply_fd`: for each job, setup, `reps(section)` repetitions, finish; returns the list
  of results. With `reply_fd` (the orchestrator's mode): reads commands `setup I`, `rep I`,
  `finish I` (I = job index) from stdin, one per line, and answers each with one JSON line on
  `reply_fd`, so two frameworks' repetitions can be interleaved in time while never overlapping.
  Exits when stdin closes.
  """
  benches: Dict[int, Any] = {}

  def get(i):
    if i not in benches:
      benches[i] = make_bench(*jobs[i])
    return benches[i]

  def finish(i):
    res = get(i).finish()
    res.update(finish_meta(jobs[i]))
    return res

  if reply_fd is None:
    results = []
    for i, (section, _) in enumerate(jobs):
      get(i).setup()
      for _ in range(reps(section)):
        get(i).rep()
      results.append(finish(i))
    return results
  with os.fdopen(reply_fd, 'w') as out:
    for line in sys.stdin:
      parts = line.split()
      if not parts:
        continue
      cmd, i = parts[0], int(parts[1]) if len(parts) > 1 else 0
      try:
        if cmd == 'finish':
          result = finish(i)
        elif cmd in ('setup', 'rep'):
          result = getattr(get(i), cmd)()
        else:
          raise ValueError(f'unknown command {cmd!r}')
        msg = {'cmd': cmd, 'result': result}
      except Exception:  # pylint: disable=broad-except
        msg = {'cmd': cmd, 'error': traceback.format_exc()}
      out.write(json.dumps(msg, default=float) + '\n')
      out.flush()
  return None


# ------------------------------------------------------------------------- worker helpers


def rep_variants(res: Dict[str, Any], calls: Dict[str, Callable[[], Any]]) -> Dict[str, float]:
  """Times each named variant once, appending to `res[f'{name}_times_s']`.

  The order alternates between repetitions, so no variant always runs first (warmest caches).
  """
  items = list(calls.items())
  if len(res[f'{items[0][0]}_times_s']) % 2:
    items.reverse()
  out = {}
  for name, call in items:
    t = timed(call, 1)[0]
    res[f'{name}_times_s'].append(t)
    out[name] = t
  return out


def finish_variants(res: Dict[str, Any], names: Sequence[str], per_call: int) -> Dict[str, Any]:
  """Adds `f'{name}_examples_per_s'` (`per_call` examples a call) and the peak RSS to `res`."""
  for name in names:
    res[f'{name}_examples_per_s'] = [per_call / t for t in res[f'{name}_times_s']]
  res['peak_rss_mb'] = peak_rss_mb()
  return res


def worker_parser(doc: str, sections: Sequence[str]) -> 'argparse.ArgumentParser':
  """The command-line flags both frameworks' workers share."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      '--job',
      action='append',
      default=None,
      help='SECTION:PROMPT_LENGTH; repeat to run several jobs in this process',
  )
  parser.add_argument('--section', choices=sorted(sections), help="a single job's section")
  parser.add_argument('--prompt-length', type=int, default=20)
  parser.add_argument('--shapes', default='full', choices=sorted(SHAPES))
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', default=None, help='result JSON (standalone mode)')
  parser.add_argument('--reply-fd', type=int, default=None, help='orchestrated mode')
  parser.add_argument('--reps', type=int, default=None, help='repetitions (standalone mode)')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--dropout', type=float, default=0.0)
  return parser


def worker_main(
    parser, argv, sections: Dict[str, Any], framework: str, meta: Callable[[Any], Dict[str, Any]]
) -> None:
  """Parses the worker's flags and runs its jobs (`run_worker`); `meta(args)` adds framework facts."""
  import argparse  # pylint: disable=g-import-not-at-top

  args = parser.parse_args(argv)
  shapes = SHAPES[args.shapes]
  jobs = parse_jobs(args.job, args.section, args.prompt_length)
  for section, _ in jobs:
    if section not in sections:
      parser.error(f'unknown section {section!r}; choose from {sorted(sections)}')
  t0 = time.time()

  def make_bench(section, p):
    job_args = argparse.Namespace(**vars(args))
    job_args.prompt_length = p
    return sections[section](job_args, shapes)

  def finish_meta(job):
    section, p = job
    return {
        'framework': framework,
        'section': section,
        'shapes': shapes.name,
        'prompt_length': p,
        'dtype': args.dtype,
        'dropout': args.dropout,
        **meta(args),
        'wall_s': time.time() - t0,
        'load_avg_end': load_avg(),
    }

  def reps(section):
    if args.reps is not None:
      return args.reps
    if section.startswith('realistic'):
      return shapes.realistic_reps
    return {
        'train': shapes.train_reps,
        'serve': shapes.serve_reps,
        'decode': shapes.decode_reps,
        'dots': shapes.dots_reps,
    }.get(section, 0)

  res = run_worker(make_bench, jobs, args.reply_fd, reps, finish_meta)
  if res is not None and args.out:
    write_json(args.out, res[0] if len(res) == 1 else res)
