"""Exceptions of fuseseg. Every message says what is wrong, names the file or key, and the fix."""


class FusesegError(Exception):
    """Base class: the CLI prints these as one clean error line (no traceback)."""


class DataError(FusesegError, ValueError):
    """A data set, image or label file is missing, unreadable or inconsistent."""


class ConfigError(FusesegError, ValueError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class CheckpointError(FusesegError, ValueError):
    """A checkpoint is corrupt, or belongs to another method or model shape."""
