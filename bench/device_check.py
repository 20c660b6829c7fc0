"""One command for a machine with an accelerator: what runs there, how fast, and what could not run.

  python bench/device_check.py --output_dir=DIR [--small] [--only=env,parity,...]
  make device-check OUT=DIR            (the same, with python3)

Runs from the source tree with the Python it is started with (no virtual
environment, no console script, nothing installed): every step is a fresh
`python -m ...` process with the repository on PYTHONPATH, bounded in time, its
output in DIR/logs/<step>.log. Steps, in order:

- `env`: Python and package versions (or "missing"), JAX's devices, the GPU as
  nvidia-smi reports it;
- `parity`: the parity tests of every family (tests/test_parity_*.py and the
  bf16 ones), JAX on the accelerator in float32 at full precision against
  transformers on the CPU;
- `measure`: `maxact-jax measure` on the demo checkpoint (built on first use);
- `qwen3-8b`: `bench --config_path` for Qwen3-8B, every layer, bfloat16, batch x
  4,096 tokens;
- `qwen3-32b`: the same for Qwen3-32B, as many layers as `--qwen3_32b_layers`
  (default: all that the planner says fit the device), the rate per layer and
  the full-depth projection reported;
- `qwen3-30b-a3b`: the MoE path (ragged_dot on accelerators) at Qwen3-30B-A3B's size.

`--small` runs the same steps at shapes a CPU finishes in minutes (one layer,
256 tokens, the dense parity tests only): a check of the script itself. Each
step's time limit is its share of `--budget_s` (480 s by default); a step that
times out or fails is recorded and the next one runs. A step whose packages are
missing is not run, and the summary says which package it lacked. At the end:
DIR/summary.md (a markdown table) and DIR/device_check.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL = os.path.join(REPO, 'configs', 'real')

# Packages every step needs, and those particular steps need besides.
BASE_PACKAGES = ('jax', 'flax', 'numpy', 'absl', 'ml_dtypes', 'safetensors', 'tokenizers', 'orbax.checkpoint',
                 'tensorstore', 'tqdm', 'matplotlib')
STEP_PACKAGES = {
    'parity': ('torch', 'transformers', 'pytest'),
    'measure': ('transformers', 'torch'),  # the demo checkpoint is built by transformers
}
VERSIONS = ('jax', 'jaxlib', 'flax', 'orbax.checkpoint', 'numpy', 'transformers', 'torch', 'tokenizers',
            'safetensors', 'tensorstore', 'pytest')
PARITY_TESTS = ('tests/test_parity_dense.py', 'tests/test_parity_moe.py', 'tests/test_parity_gemma.py',
                'tests/test_parity_qwen2_5_vl.py', 'tests/test_qwen35.py', 'tests/test_bf16.py')
# Share of the time budget per step (the rest of the budget rolls over to later steps).
SHARES = {'env': 0.04, 'parity': 0.25, 'measure': 0.13, 'qwen3-8b': 0.17, 'qwen3-32b': 0.23, 'qwen3-30b-a3b': 0.18}
STEPS = tuple(SHARES)


def missing_packages(names) -> list[str]:
  """The importable names among `names` that this Python cannot import."""
  missing = []
  for name in names:
    try:
      found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      missing.append(name)
  return missing


def run_process(cmd: list[str], log_path: str, timeout_s: float, env: dict[str, str]) -> dict:
  """Run `cmd` in the repository, output to `log_path`; on timeout its whole process
  group is killed (a test run's workers too)."""
  t0 = time.perf_counter()
  with open(log_path, 'w', encoding='utf-8') as log:
    log.write('$ ' + ' '.join(cmd) + '\n')
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
      code = proc.wait(timeout=max(timeout_s, 1))
      status = 'ok' if code == 0 else f'failed (exit {code})'
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      status = f'timed out after {timeout_s:.0f} s'
  return {'status': status, 'seconds': round(time.perf_counter() - t0, 1), 'log': os.path.relpath(log_path)}


def tail(path: str, lines: int = 3) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return ' / '.join(l.strip() for l in f.read().splitlines()[-lines:] if l.strip())
  except OSError:
    return ''


def probe(out: str, fit_config: str | None, batch: int) -> None:
  """Run in a child process (JAX holds the accelerator's memory for as long as the
  process that started it lives): versions, devices, and how many layers of
  `fit_config` the planner fits on the device; written to out/env.json."""
  info: dict = {'python': sys.version.split()[0], 'executable': sys.executable, 'platform': platform.platform(),
                'versions': {}}
  for name in VERSIONS:
    try:
      module = __import__(name, fromlist=['__version__'])
      info['versions'][name] = getattr(module, '__version__', 'unknown')
    except Exception as e:  # pylint: disable=broad-except  (report whatever stops an import)
      info['versions'][name] = f'missing ({type(e).__name__})'
  try:
    import jax  # pylint: disable=import-outside-toplevel
    info['backend'] = jax.default_backend()
    info['devices'] = [{'kind': d.device_kind, 'platform': d.platform, 'id': d.id,
                        'memory_bytes': (d.memory_stats() or {}).get('bytes_limit')} for d in jax.local_devices()]
  except Exception as e:  # pylint: disable=broad-except
    info['devices_error'] = f'{type(e).__name__}: {e}'
  try:
    smi = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm',
                          '--format=csv,noheader'], capture_output=True, text=True, timeout=20, check=False)
    info['nvidia_smi'] = smi.stdout.strip() or smi.stderr.strip()
  except (OSError, subprocess.TimeoutExpired):
    info['nvidia_smi'] = 'not available'
  if fit_config:
    try:
      info['fit_layers'] = {fit_config: layers_that_fit(fit_config, batch, 4096)}
    except Exception as e:  # pylint: disable=broad-except
      info['fit_layers_error'] = f'{type(e).__name__}: {e}'
  with open(os.path.join(out, 'env.json'), 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=1)


def env_summary(out: str) -> str:
  with open(os.path.join(out, 'env.json'), encoding='utf-8') as f:
    info = json.load(f)
  devices = info.get('devices') or []
  what = f'{len(devices)} x {devices[0]["kind"]} ({info["backend"]})' if devices else info.get('devices_error', '?')
  missing = [n for n, v in info['versions'].items() if str(v).startswith('missing')]
  return (f'{what}; python {info["python"]}, jax {info["versions"].get("jax")}, torch {info["versions"].get("torch")}'
          + (f'; missing: {", ".join(missing)}' if missing else ''))


def bench_command(config: str, out: str, small: bool, layers: int | None, batch: int) -> list[str]:
  cmd = [sys.executable, '-m', 'maxact_jax.cli', 'bench', f'--config_path={os.path.join(REAL, config)}',
         f'--output_dir={os.path.join(out, "bench")}', '--dtype=bfloat16']
  if small:
    return cmd + ['--num_layers=1', '--seq_len=256', '--batch_size=1', '--steps=1']
  cmd += [f'--batch_size={batch}', '--seq_len=4096', '--steps=3']
  return cmd + ([f'--num_layers={layers}'] if layers else [])


def layers_that_fit(config_name: str, batch: int, seq: int) -> int | None:
  """The most layers of a config whose bf16 step the planner fits on this device (None: all)."""
  sys.path.insert(0, REPO)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from maxact_jax import bench_size, measure_step, plan  # pylint: disable=import-outside-toplevel

  full, _ = bench_size.load_bench_config(os.path.join(REAL, config_name))
  usable = measure_step.device_memory_bytes() * plan.HEADROOM
  for n in range(full.num_hidden_layers, 0, -1):
    config, _ = bench_size.load_bench_config(os.path.join(REAL, config_name), n)
    if plan.estimate(config, jnp.bfloat16, 'none', {}, batch, seq).total <= usable:
      return None if n == full.num_hidden_layers else n
  return 1


def bench_detail(out: str, config_name: str) -> dict:
  """The newest bench.json entry of a config (the one the step just wrote)."""
  try:
    with open(os.path.join(out, 'bench', 'bench.json'), encoding='utf-8') as f:
      sizes = json.load(f).get('sizes', {})
  except (OSError, ValueError):
    return {}
  mine = [r for k, r in sizes.items() if k.startswith(config_name + '/')]
  return max(mine, key=lambda r: r['finished_at']) if mine else {}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output_dir', required=True)
  parser.add_argument('--small', action='store_true', help='CPU-sized shapes: a check of the script itself')
  parser.add_argument('--only', default=','.join(STEPS), help=f'steps to run, of {",".join(STEPS)}')
  parser.add_argument('--budget_s', type=float, default=480.0, help='time for all steps together')
  parser.add_argument('--batch_size', type=int, default=8, help='rows of 4,096 tokens in the bench steps')
  parser.add_argument('--qwen3_32b_layers', type=int, default=None,
                      help='layers of Qwen3-32B to run (default: as many as the planner fits on the device)')
  parser.add_argument('--probe', default=None, help=argparse.SUPPRESS)  # the env step's child process
  args = parser.parse_args(argv)
  if args.probe is not None:
    probe(args.output_dir, args.probe or None, args.batch_size)
    return 0
  steps = [s.strip() for s in args.only.split(',') if s.strip()]
  unknown = [s for s in steps if s not in SHARES]
  if unknown:
    parser.error(f'unknown steps {unknown}; choose from {",".join(STEPS)}')
  out = os.path.abspath(args.output_dir)
  os.makedirs(os.path.join(out, 'logs'), exist_ok=True)
  # Each step alone on the device: let JAX take up to 92% of an accelerator's memory
  # (Qwen3-32B's bf16 weights are 61 GB), and compile afresh (no cache from a run before).
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), PYTHONUNBUFFERED='1',
             MAXACT_COMPILATION_CACHE='off', XLA_PYTHON_CLIENT_MEM_FRACTION='0.92')
  start = time.perf_counter()
  planned = sum(SHARES[s] for s in steps)
  results: dict[str, dict] = {}
  fit_layers: dict[str, int | None] = {}
  base_missing = missing_packages(BASE_PACKAGES)
  for i, step in enumerate(steps):
    elapsed = time.perf_counter() - start
    left = args.budget_s - elapsed
    share = SHARES[step] / sum(SHARES[s] for s in steps[i:]) if planned else 1
    limit = max(left * share, 30.0)
    missing = base_missing + missing_packages(STEP_PACKAGES.get(step, ()))
    log = os.path.join(out, 'logs', f'{step}.log')
    if step == 'env':
      fit = 'Qwen3-32B' if 'qwen3-32b' in steps and not args.small and not args.qwen3_32b_layers else ''
      cmd = [sys.executable, os.path.abspath(__file__), f'--output_dir={out}', f'--probe={fit}',
             f'--batch_size={args.batch_size}']
      results[step] = run_process(cmd, log, limit, env)
      if results[step]['status'] == 'ok':
        results[step]['detail'] = env_summary(out)
        with open(os.path.join(out, 'env.json'), encoding='utf-8') as f:
          fit_layers.update(json.load(f).get('fit_layers', {}))
      else:
        results[step]['detail'] = tail(log)
      print(f'[{elapsed:6.0f} s] {step}: {results[step]["status"]}: {results[step]["detail"]}', flush=True)
      continue
    if missing:
      results[step] = {'status': 'not run', 'detail': f'missing package(s): {", ".join(missing)}'}
      print(f'[{elapsed:6.0f} s] {step}: not run (missing {", ".join(missing)})', flush=True)
      continue
    if step == 'parity':
      tests = PARITY_TESTS[:1] if args.small else PARITY_TESTS
      cmd = [sys.executable, '-m', 'pytest', '-q', '-m', 'not slow', '-p', 'no:cacheprovider',
             f'--junitxml={os.path.join(out, "parity.xml")}', *tests]
      if args.small:
        cmd += ['-k', 'qwen3']
    elif step == 'measure':
      cmd = [sys.executable, '-m', 'maxact_jax.cli', 'measure', '--flagfile=configs/demo.flags',
             f'--output_dir={os.path.join(out, "demo")}', '--progress=false']
      if args.small:
        cmd += ['--max_samples=16', '--max_seq_len=128']
    else:
      config = {'qwen3-8b': 'Qwen3-8B', 'qwen3-32b': 'Qwen3-32B', 'qwen3-30b-a3b': 'Qwen3-30B-A3B'}[step]
      layers = None
      if step == 'qwen3-32b' and not args.small:
        layers = args.qwen3_32b_layers or fit_layers.get(config)
      cmd = bench_command(config, out, args.small, layers, args.batch_size)
    print(f'[{elapsed:6.0f} s] {step}: running, at most {limit:.0f} s', flush=True)
    results[step] = run_process(cmd, log, limit, env)
    if step in ('qwen3-8b', 'qwen3-32b', 'qwen3-30b-a3b') and results[step]['status'] == 'ok':
      results[step]['bench'] = bench_detail(out, {'qwen3-8b': 'Qwen3-8B', 'qwen3-32b': 'Qwen3-32B',
                                                  'qwen3-30b-a3b': 'Qwen3-30B-A3B'}[step])
    else:  # a failure's last lines, or what an ok step ends with (pytest's count, measure's files)
      results[step]['detail'] = tail(log, 1 if results[step]['status'] == 'ok' else 3)
    print(f'          {results[step]["status"]} in {results[step]["seconds"]} s', flush=True)
  total = time.perf_counter() - start
  doc = {'small': args.small, 'budget_s': args.budget_s, 'total_s': round(total, 1), 'steps': results}
  with open(os.path.join(out, 'device_check.json'), 'w', encoding='utf-8') as f:
    json.dump(doc, f, indent=1)
  summary = format_summary(doc)
  with open(os.path.join(out, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(summary)
  print(summary)
  return 0 if all(r['status'] == 'ok' for r in results.values()) else 1


def format_summary(doc: dict) -> str:
  lines = [f'# Device check{" (--small)" if doc["small"] else ""}: {doc["total_s"]:.0f} s of {doc["budget_s"]:.0f}',
           '', '| step | status | s | details |', '| --- | --- | --- | --- |']
  for step, r in doc['steps'].items():
    b = r.get('bench') or {}
    if b:
      detail = (f'{b["num_layers"]}/{b["config_layers"]} layers, {b["batch_size"]}x{b["seq_len"]}: '
                f'{b["tokens_per_s"]:,.0f} tok/s, MFU {b["mfu"]:.3f} (forward {b["forward_mfu"]:.3f}), '
                f'overhead {b["overhead_ratio"]:.3f}, step {b["stats_step_s"]:.3g} s '
                f'({b["per_layer_s"]:.3g} s/layer, full depth {b["full_depth_step_s"]:.3g} s), '
                f'compile {b["compile_s"]:.0f} s, XLA memory {b["step_memory_bytes"] / 2**30:.1f} GiB, '
                f'peak {b["peak_memory_bytes"] / 2**30:.1f} GiB, paper corpus {b["paper_hours"]:.3g} h')
    else:
      detail = r.get('detail', '')
    lines.append(f'| {step} | {r["status"]} | {r.get("seconds", "")} | {detail.replace("|", "/")} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  raise SystemExit(main())
