"""`maxact-jax plan`: size a run from config.json alone, before any weight is read.

Prints the model type, total and active parameter counts, every tap, the
per-device memory of the pmap and mesh layouts, and the parallelism and batch
size `measure --parallelism=auto` would choose (`--json` for machines).
"""

from __future__ import annotations

import json

import jax
from absl import flags

from maxact_jax import plan, results
from maxact_jax.commands import common
from maxact_jax.errors import UserError
from maxact_jax.families import load_config

FLAGS = flags.FlagValues()
flags.DEFINE_string('model_path', None, 'A directory holding config.json, or a GGUF file (weights are not read).',
                    flag_values=FLAGS)
flags.DEFINE_string('dtype', 'bfloat16', f'Weight and activation dtype: one of {", ".join(common.DTYPES)}.',
                    flag_values=FLAGS)
flags.DEFINE_integer('num_devices', None, 'Devices to plan for (default: the devices JAX sees).', flag_values=FLAGS)
flags.DEFINE_float('device_memory_gb', None, 'Memory of one device in GiB (default: what the device reports; '
                   'host memory on CPU).', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', None, 'Global batch to check (default: the largest that fits).',
                     flag_values=FLAGS)
flags.DEFINE_integer('max_seq_len', 32768, 'Tokens per row (the padded batch length).', flag_values=FLAGS)
flags.DEFINE_boolean('json', False, 'Print the plan as JSON.', flag_values=FLAGS)


def run() -> int:
  if not FLAGS.model_path:
    raise UserError('--model_path is required (a directory holding config.json, or a GGUF file)')
  common.check_dtype(FLAGS.dtype)
  common.check_positive('num_devices', FLAGS.num_devices)
  common.check_positive('batch_size', FLAGS.batch_size)
  common.check_positive('max_seq_len', FLAGS.max_seq_len, allow_none=False)
  if FLAGS.device_memory_gb is not None and FLAGS.device_memory_gb <= 0:
    raise UserError(f'--device_memory_gb must be positive, got {FLAGS.device_memory_gb}')
  config = load_config(FLAGS.model_path)
  if FLAGS.device_memory_gb:
    device_bytes, source = int(FLAGS.device_memory_gb * 2**30), '--device_memory_gb'
  else:
    device_bytes, source = plan.device_memory()
  num_devices = FLAGS.num_devices or jax.device_count()
  p = plan.plan(config, FLAGS.dtype, num_devices, device_bytes, FLAGS.max_seq_len, FLAGS.batch_size, source)
  p['model_name'] = results.model_name_of(FLAGS.model_path)
  if FLAGS.json:
    print(json.dumps(p, indent=2))
  else:
    print(plan.format_plan(p, p['model_name']))
  return 0
