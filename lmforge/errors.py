"""User-facing errors.

Every mistake a user can make (a typo in a config key, a missing path, a corrupt shard) raises a
subclass of `LmforgeError` whose message says what is wrong and what to do. The CLI prints these
without a traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """A problem the user can fix; the message is shown as is."""


class ConfigError(LmforgeError):
    """Invalid configuration: unknown key, wrong type, impossible value."""


class DataError(LmforgeError):
    """Invalid or corrupt input data, tokenizer or prepared dataset."""


class CheckpointError(LmforgeError):
    """Missing, incomplete or corrupt checkpoint, or one that does not fit the run."""


class WriteError(LmforgeError):
    """A write failed (a full disk, no permission, an I/O error); what was written before is intact.
    The message starts with `util.write_failure`'s line: "disk full at PATH, N bytes free" or
    "cannot write PATH: REASON"."""
