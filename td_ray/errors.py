"""The errors td-ray raises on bad input or output: the CLI prints these as one clear message."""


class TdRayError(ValueError):
    """Bad input, config or model: the message names the item and the fix."""


class ModelError(TdRayError):
    """A model that cannot be found or used: the message names it and says how to fix it."""


class ExactlyOnceError(TdRayError):
    """A stage's output does not hold each input key exactly once; nothing was committed."""


class StaleIndexError(TdRayError):
    """The saved index does not match the student searching it, or its own files: re-run the index stage."""
