#!/usr/bin/env python3
"""Stacks trained prompts (`.npy`, `[P, H]` each) into one prompt bank (`[N, P, H]`) for serving.

    python scripts/make_prompt_bank.py bank.npy \\
        sst2/numpy_checkpoints/checkpoint_1100000/encoder.prompt.prompt.prompt.npy \\
        rte/numpy_checkpoints/checkpoint_1100000/encoder.prompt.prompt.prompt.npy

Prompt i of the bank is the i-th file: examples whose `prompt_ids` feature is i use it. Serve the
bank with the frozen checkpoint (one model, every task in the same batches):

    python -m prompt_tuning.infer --gin_file=models/t5_1_1_base_prompt.gin \\
        --gin_file=runs/prompt_infer.gin --gin.PROMPT_FILE="'bank.npy'" \\
        --gin.prompted.PromptEncoderDecoder.num_prompts=2 ...

The prompts must have one shape. An existing output is kept unless `--overwrite` is given; the bank
is written to a temporary file and renamed, so a failed run leaves no partial file.
"""

import argparse
import os
import sys

import numpy as np


def make_bank(paths):
  """`[N, P, H]` from `N` prompt files; a clear error when a file is unusable or shapes differ."""
  prompts = []
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f'{path}: no such prompt file.')
    prompt = np.load(path)
    if prompt.ndim != 2:
      raise ValueError(
          f'{path}: a prompt is [length, embed], got shape {prompt.shape}. Pass the '
          '`.npy` written under MODEL_DIR/numpy_checkpoints/checkpoint_<step>/.'
      )
    if prompts and prompt.shape != prompts[0].shape:
      raise ValueError(
          f'{path}: shape {prompt.shape} differs from {paths[0]}: {prompts[0].shape}. '
          'A bank holds prompts of one length and width (train them with one '
          'PROMPT_LENGTH).'
      )
    prompts.append(prompt)
  return np.stack(prompts).astype(prompts[0].dtype)


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('output', help='the bank to write (.npy)')
  parser.add_argument('prompts', nargs='+', help='prompt files, in prompt-id order')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  args = parser.parse_args(argv)
  if os.path.exists(args.output) and not args.overwrite:
    parser.error(f'{args.output} exists; pass --overwrite to replace it.')
  try:
    bank = make_bank(args.prompts)
  except ValueError as e:
    parser.error(str(e))
  tmp = f'{args.output}.tmp-{os.getpid()}.npy'
  try:
    np.save(tmp, bank)
    os.replace(tmp, args.output)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  for i, path in enumerate(args.prompts):
    print(f'prompt_ids {i}: {path}')
  print(f'wrote {args.output}: {bank.shape[0]} prompts of shape {bank.shape[1:]} ({bank.dtype})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
