"""The errors megatron-prune raises for input it refuses, with one common base class.

Every algorithm (Minitron, FastNAS, GradNAS) raises these before any expensive work; the message names the
field and says how to fix it. Catch `PruneError` to handle all of them.
"""


class PruneError(Exception):
    """Base class of every error megatron-prune raises on purpose (never for a bug of its own)."""


class PruneConfigError(PruneError, ValueError):
    """Bad user input. The message names the field and says how to fix it."""


class UnsupportedModelError(PruneError, ValueError):
    """The model holds a module or architecture this package cannot prune (the message names it)."""


class ScoresFileError(PruneError, ValueError):
    """A Minitron scores file that cannot serve this model or these settings (or is not a scores file)."""


class RunCardError(PruneConfigError):
    """A distillation run card that cannot drive a distillation; the message names the field."""


class RoundTripError(PruneError):
    """A round-trip check found logits that differ beyond its tolerance; nothing was written."""
