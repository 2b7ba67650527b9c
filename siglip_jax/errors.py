"""The one mark of a user mistake: bad input or an environment the user can fix.

Entry points print such an error as one `error: ...` line and exit with status 2, without a
traceback (`siglip_jax.cli`). Every error class that describes bad input derives from
`UserError` (besides its usual base, e.g. ValueError), so a new check needs no new `except`.
"""


class UserError(Exception):
  """Bad input (a config key, a path, a data set) or environment; the message says which."""
