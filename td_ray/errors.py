"""The base of every error td-ray raises on bad input: the CLI prints these as one clear message."""


class TdRayError(ValueError):
    """Bad input, config or model: the message names the item and the fix."""
