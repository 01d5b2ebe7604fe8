"""Exception classes. Every error threelc raises on purpose is a ``ThreeLCError``."""


class ThreeLCError(Exception):
    """Base class of every error raised by threelc."""


class ConfigurationError(ThreeLCError, ValueError):
    """A setting is out of range, or ranks disagree about their settings."""


class DecodeError(ThreeLCError, ValueError):
    """A payload is truncated, corrupted, of another version, or otherwise not 3LC."""


class CommunicationError(ThreeLCError, RuntimeError):
    """A collective failed or timed out (a peer died or hung); says which step and bucket."""
