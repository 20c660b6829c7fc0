"""One module per `maxact-jax <command>`.

Each module defines its absl flags at import (only the chosen command's module
is imported, so flags never collide) and exposes `run() -> int`, a thin layer
over library functions that tests call directly. Flags shared by several
commands are defined once in `maxact_jax.commands.common`.
"""
