"""The `maxact-jax <command>` modules: each defines its flags and a `run() -> int`."""
