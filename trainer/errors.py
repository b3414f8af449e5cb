"""Errors a user can fix. Each message names the field or file at fault.

The page and the CLI show `str(error)` as is, so messages are written for people, and never
carry a stack trace.
"""


class AtelierError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(AtelierError, ValueError):
    """A config key is missing, unknown, malformed or out of range."""


class ModelLoadError(AtelierError):
    """The base model (or VAE) could not be found or read."""


class DatasetError(AtelierError):
    """A concept folder is missing or holds no usable image."""


class TrainingError(AtelierError):
    """Training cannot go on (NaN loss, unsupported dtype on this device, ...)."""


class MaskError(AtelierError):
    """Masks cannot be made: a bad setting, a missing folder or model, an unusable image."""


class CaptionError(AtelierError):
    """Captions cannot be made or edited: a bad setting, a missing folder or model."""
