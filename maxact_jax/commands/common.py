"""Flags that several commands share, defined once here, and their checks.

Every command owns a `flags.FlagValues` of its own (its module's `FLAGS`), so
two commands can define a flag of the same name with different defaults, and
several commands can run in one process (the tests do).
"""

from __future__ import annotations

import os

from absl import flags

from maxact_jax.errors import UserError

DTYPES = ('bfloat16', 'float32', 'float16')


def define_model_flags(fv: flags.FlagValues, dtype: str = 'bfloat16') -> None:
  flags.DEFINE_string('model_path', None, 'Hugging Face checkpoint directory (config.json, '
                      '*.safetensors, tokenizer.json), a GGUF file (or a directory holding one), or a '
                      'converted model directory. Default: the demo checkpoint, built on first use.',
                      flag_values=fv)
  flags.DEFINE_string('tokenizer', None, "Tokenizer directory (tokenizer.json) to use instead of the "
                      "checkpoint's own (a GGUF file's is built from its metadata).", flag_values=fv)
  flags.DEFINE_string('dtype', dtype, f'Activation and weight dtype: one of {", ".join(DTYPES)}.',
                      flag_values=fv)


def define_data_flags(fv: flags.FlagValues, max_samples: int | None = 2000, max_seq_len: int | None = 32768,
                      batch_size: int = 8) -> None:
  flags.DEFINE_string('data_path', None, 'Corpus: jsonl with input_ids (the reference format) or text '
                      '(+ optional category). Default: the built-in corpus.', flag_values=fv)
  flags.DEFINE_integer('max_samples', max_samples, 'Use at most this many samples (in file order).',
                       flag_values=fv)
  flags.DEFINE_integer('max_seq_len', max_seq_len, 'Truncate samples to this many tokens (reported).',
                       flag_values=fv)
  flags.DEFINE_integer('batch_size', batch_size, 'Sequences per batch.', flag_values=fv)


def check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if value is None or value < 1:
    raise UserError(f'--{name} must be a positive integer, got {value}')


def check_dtype(value: str) -> str:
  if value not in DTYPES:
    raise UserError(f'--dtype={value} is not supported (choose from {", ".join(DTYPES)})')
  return value


def enable_compilation_cache() -> str | None:
  """Keep compiled steps on disk (XLA's persistent cache), so a re-run, a resumed
  run or a sweep over one model compiles each batch shape once.

  The folder is $JAX_COMPILATION_CACHE_DIR when set, else
  ~/.cache/maxact-jax/xla; MAXACT_COMPILATION_CACHE=off turns it off.
  """
  if os.environ.get('MAXACT_COMPILATION_CACHE', '').lower() in ('off', '0', 'false'):
    return None
  # Start-up: only the commands that compute import JAX.
  import jax  # pylint: disable=import-outside-toplevel

  path = os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'maxact-jax', 'xla')
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  return path
