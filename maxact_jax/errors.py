"""The one exception type that reaches the user as a one-line `error:` message."""


class UserError(Exception):
  """Bad input: a missing file, a malformed corpus, a flag out of range.

  The CLI prints `error: <message>` on stderr and exits with status 2. Raise it
  with a message that names the thing that is wrong and, where it helps, what
  would be right.
  """
