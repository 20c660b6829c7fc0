"""`maxact-jax convert`: a Hugging Face or GGUF checkpoint, once, to an orbax model directory.

The output directory is itself a valid --model_path for measure and plan: the
parameters as an orbax checkpoint (restored straight into any layout's
sharding), config.json and tokenizer files beside them, and a record of the
source checkpoint and converter version. Conversion streams layer by layer:
peak host memory is about one checkpoint tensor.
"""

from __future__ import annotations

import time

from absl import flags

import converters
from maxact_jax import measure_step
from maxact_jax.commands import common
from maxact_jax.errors import UserError

FLAGS = flags.FlagValues()
common.define_model_flags(FLAGS)
flags.DEFINE_string('output_dir', None, 'The orbax model directory to create (must not exist, or be empty).',
                    flag_values=FLAGS)
flags.DEFINE_boolean('verbose', False, 'Print every parameter as it is written.', flag_values=FLAGS)


def run() -> int:
  common.check_dtype(FLAGS.dtype)
  if not FLAGS.model_path:
    raise UserError('--model_path is required (a Hugging Face checkpoint directory or a GGUF file)')
  if not FLAGS.output_dir:
    raise UserError('--output_dir is required (the orbax model directory to create)')
  t0 = time.perf_counter()
  meta = converters.convert(FLAGS.model_path, FLAGS.output_dir, measure_step.DTYPES[FLAGS.dtype],
                            log=print if FLAGS.verbose else None, tokenizer=FLAGS.tokenizer)
  size = sum(f['bytes'] for f in meta['source']['files'])
  source = meta['weights']['source'] or {}
  stored = ', '.join(f'{n} {t}' for t, n in (source.get('quant_types') or {}).items())
  print(f'converted {FLAGS.model_path} ({meta["model_type"]}, {len(meta["params"])} parameters, '
        f'{size / 2**30:.2f} GiB of {source.get("format", "?")}: {stored}) to {FLAGS.output_dir} in '
        f'{meta["dtype"]} in {time.perf_counter() - t0:.1f} s')
  print(f'copied beside the parameters: {", ".join(meta["copied_files"]) or "nothing"}')
  return 0
