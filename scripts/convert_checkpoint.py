#!/usr/bin/env python3
"""Converts T5 checkpoints between the T5X legacy and Hugging Face formats.

Examples::

  # Hugging Face transformers T5 directory -> T5X checkpoint directory.
  python scripts/convert_checkpoint.py --input /ckpts/t5-v1_1-base \\
      --output /ckpts/t5x/checkpoint_0 --to t5x

  # T5X checkpoint -> Hugging Face (configuration inferred from the shapes,
  # or given as a preset of prompt_tuning.architectures.t5.get_config).
  python scripts/convert_checkpoint.py \\
      --input gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_base/checkpoint_1100000 \\
      --output /ckpts/t5_1_1_lm100k_base_hf --to huggingface --config t5_1_1_base

  # A checkpoint of this project (MODEL_DIR/checkpoint_<step>, or MODEL_DIR for
  # its latest): its trained parameters (the prompt) over the frozen backbone
  # its run started from (recorded in the checkpoint; --backbone overrides it).
  python scripts/convert_checkpoint.py --input /tmp/sst2_prompt/checkpoint_1150000 \\
      --output /ckpts/sst2_prompt_t5x/checkpoint_1150000 --to t5x

The input format is detected once (:func:`prompt_tuning.checkpoints.formats.
resolve`) and the parameters are read with :func:`prompt_tuning.checkpoints.
formats.load_params`. A checkpoint this project wrote holds only the parameters
its run trained (the prompt, or every weight for model tuning); the frozen ones
are read from the run's INITIAL_CHECKPOINT_PATH, which the checkpoint records,
or from ``--backbone``. Only parameters are converted: a T5X output gets empty
optimizer state (and keeps the prompt, as the original prompt-tuning code's
checkpoints do), and prompt parameters (``*/prompt/*``) are dropped when
writing Hugging Face. An existing output is never replaced without
``--overwrite``; outputs are written to a temporary sibling and renamed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

try:
  import prompt_tuning  # pylint: disable=unused-import
except ImportError:  # Run from a checkout without installing.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from prompt_tuning import fs  # pylint: disable=g-import-not-at-top
from prompt_tuning import params as params_lib  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import formats  # pylint: disable=g-import-not-at-top
from prompt_tuning.checkpoints import t5x_format  # pylint: disable=g-import-not-at-top

TARGETS = ('t5x', 'huggingface')
_DTYPES = ('float32', 'bfloat16', 'float16')


def _log(msg: str) -> None:
  print(f'[convert_checkpoint] {msg}', flush=True)


def _summary(params: Any) -> str:
  flat = params_lib.flatten_params(params)
  nbytes = sum(getattr(v, 'nbytes', 0) for v in flat.values())
  n = sum(int(getattr(v, 'size', 0)) for v in flat.values())
  return f'{len(flat)} arrays, {n / 1e6:.2f}M parameters, {nbytes / 2**20:.1f} MiB'


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses command-line flags."""
  p = argparse.ArgumentParser(
      description='Convert T5 checkpoints between T5X legacy (msgpack + zarr) '
      'and Hugging Face transformers directories.'
  )
  p.add_argument(
      '--input',
      required=True,
      help='Input checkpoint: a T5X checkpoint_<step> directory (or '
      'its "checkpoint" file, or a model directory) or a Hugging '
      'Face T5 directory. Local or gs://.',
  )
  p.add_argument(
      '--output',
      required=True,
      help='Output directory to create (for T5X, the ' 'checkpoint_<step> directory itself).',
  )
  p.add_argument('--to', required=True, choices=TARGETS, help='Output format.')
  p.add_argument(
      '--config',
      default=None,
      help='T5Config preset name (prompt_tuning.architectures.t5.'
      'get_config), e.g. t5_1_1_base; for T5X -> Hugging Face. '
      'Default: inferred from the parameter shapes.',
  )
  p.add_argument(
      '--head_dim',
      type=int,
      default=64,
      help='Head size assumed when inferring the configuration and '
      'the checkpoint does not fix it (no relpos embedding).',
  )
  p.add_argument(
      '--step',
      type=int,
      default=None,
      help='Step stored in a T5X output (default: the input ' "checkpoint's step, or 0).",
  )
  p.add_argument(
      '--dtype',
      default=None,
      choices=_DTYPES,
      help='Cast floating-point parameters to this dtype (default: ' 'keep the stored dtypes).',
  )
  p.add_argument(
      '--backbone',
      default=None,
      help='For a checkpoint of this project that holds only its trained parameters: the '
      'checkpoint of the frozen parameters (default: the INITIAL_CHECKPOINT_PATH its run '
      'recorded).',
  )
  p.add_argument('--overwrite', action='store_true', help='Replace an existing output.')
  return p.parse_args(argv)


def _save_huggingface(output: str, config: Any, params: Any, overwrite: bool) -> None:
  """Writes through a temporary sibling, then renames (atomic locally)."""
  from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

  output = fs.abspath(output)
  tmp = f'{output}.tmp-{int(time.time())}'
  try:
    huggingface.save_t5(tmp, config, params)
    if fs.exists(output) and not overwrite:
      raise FileExistsError(f'{output} appeared during the conversion.')
    # The old output is replaced only once the new one is complete.
    fs.rename(tmp, output, overwrite=overwrite)
  finally:
    fs.rmtree(tmp, missing_ok=True)


def _with_backbone(ckpt: Any, trained: Any, backbone: str | None) -> Any:
  """The trained parameters of our checkpoint `ckpt` over the frozen ones of its backbone."""
  from prompt_tuning.checkpoints import orbax_format  # pylint: disable=g-import-not-at-top

  flat = params_lib.flatten_params(trained)
  if 'token_embedder/embedding' in flat and backbone is None:
    return trained  # Model tuning: the checkpoint holds every weight.
  recorded = orbax_format.read_metadata(ckpt.path).get('initial_checkpoint_path')
  source = backbone or recorded
  names = ', '.join(sorted(flat)[:3]) + (' ...' if len(flat) > 3 else '')
  if not source or source == 'None':
    raise ValueError(
        f'{ckpt.path} is a checkpoint of this project holding only the parameters its run '
        f'trained ({names}), and its run recorded no INITIAL_CHECKPOINT_PATH: pass the frozen '
        'checkpoint with --backbone=PATH.'
    )
  if not fs.exists(source):
    raise FileNotFoundError(
        f'{ckpt.path} holds only the parameters its run trained ({names}); its frozen '
        f'parameters were read from {source}, which does not exist (any more): pass the frozen '
        'checkpoint with --backbone=PATH.'
    )
  base = formats.resolve(source)
  if base.format == 'huggingface':
    from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

    _, frozen = huggingface.load_t5(base.path)
  else:
    frozen = formats.load_params(base)
  merged = params_lib.flatten_params(frozen)
  merged.update(flat)
  _log(f'{len(flat)} trained parameter(s) ({names}) over the frozen parameters of {source}')
  return params_lib.unflatten_params(merged)


def convert(
    input_path: str,
    output_path: str,
    to: str,
    *,
    config: str | None = None,
    head_dim: int = 64,
    step: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    backbone: str | None = None,
) -> str:
  """Converts `input_path` to format `to` at `output_path`; returns it.

  Raises:
    FileNotFoundError, FileExistsError, ValueError: with a message naming the
      cause (see :func:`main`).
  """
  if to not in TARGETS:
    raise ValueError(f'--to must be one of {TARGETS}, got {to!r}.')
  if not fs.exists(input_path):
    raise FileNotFoundError(f'Input {input_path} does not exist.')
  if fs.exists(output_path) and not overwrite:
    raise FileExistsError(
        f'Output {output_path} already exists; refusing to overwrite it. '
        'Choose another --output or pass --overwrite.'
    )
  if fs.abspath(input_path) == fs.abspath(output_path):
    raise ValueError('--input and --output are the same path.')

  t0 = time.time()
  ckpt = formats.resolve(input_path)  # The one format detection.
  _log(f'input {input_path}: {ckpt.format} format ({ckpt.path})')
  source_config = None
  if ckpt.format == 'huggingface':
    from prompt_tuning.checkpoints import huggingface  # pylint: disable=g-import-not-at-top

    source_config, params = huggingface.load_t5(ckpt.path)
  elif ckpt.is_ours:
    params = _with_backbone(ckpt, formats.load_params(ckpt), backbone)
  else:
    params = formats.load_params(ckpt)
  _log(f'loaded {_summary(params)} in {time.time() - t0:.1f}s')
  if dtype is not None:
    flat = {k: t5x_format.cast(v, dtype) for k, v in params_lib.flatten_params(params).items()}
    params = params_lib.unflatten_params(flat)
    _log(f'cast floating-point parameters to {dtype}')

  t1 = time.time()
  if to == 't5x':
    if step is None:
      step = formats.read_step(ckpt) or 0
    _log(f'writing T5X checkpoint {output_path} (step {step})')
    t5x_format.save(output_path, params, step, overwrite=overwrite)
  else:
    flat = params_lib.flatten_params(params)
    prompt = [k for k in flat if '/prompt/' in f'/{k}/']
    if prompt:
      _log(
          f'dropping {len(prompt)} prompt parameter(s) with no Hugging Face '
          f'counterpart: {", ".join(prompt)}'
      )
      params = params_lib.unflatten_params({k: v for k, v in flat.items() if k not in prompt})
    if config is not None or source_config is None:
      cfg = formats.infer_t5_config(params, config, head_dim=head_dim)
      how = f'preset {config!r} (checked against shapes)' if config else ('inferred from shapes')
    else:
      cfg = source_config
      how = 'from the input config.json'
    _log(f'T5 config {how}: {cfg}')
    from prompt_tuning.architectures import t5  # pylint: disable=g-import-not-at-top

    t5.check_params(cfg, params, what=f'input checkpoint {input_path}')
    _log(f'writing Hugging Face directory {output_path}')
    _save_huggingface(output_path, cfg, params, overwrite)
  _log(f'done: wrote {output_path} in {time.time() - t1:.1f}s ' f'(total {time.time() - t0:.1f}s)')
  return output_path


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = parse_args(argv)
  try:
    convert(
        args.input,
        args.output,
        args.to,
        config=args.config,
        head_dim=args.head_dim,
        step=args.step,
        dtype=args.dtype,
        overwrite=args.overwrite,
        backbone=args.backbone,
    )
  except (FileNotFoundError, FileExistsError, ValueError, KeyError, NotImplementedError) as e:
    print(f'convert_checkpoint: error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  from prompt_tuning.runtime import launch  # pylint: disable=g-import-not-at-top

  launch.fast_shutdown()
  sys.exit(main())
