"""User-facing errors.

Every error a user can cause (bad model, bad mesh, bad hardware file, bad CLI value) is an AutoparError whose
message says what was wrong, where, and what to do. The CLI prints `autopar: error: <message>` and exits 2;
library callers can catch the specific subclass.
"""


class AutoparError(Exception):
    """Base class: a problem with the user's input, reported as one actionable line."""


class ModelError(AutoparError):
    """The model could not be built, loaded or traced."""


class HardwareError(AutoparError):
    """A hardware name or file is unknown or malformed."""


class MeshError(AutoparError):
    """The mesh, world size or degrees do not fit the model, batch or devices."""


class PlanError(AutoparError):
    """No plan exists under the constraints, or a plan file does not fit."""


class NotSupportedYet(AutoparError):
    """A known capability that this version does not provide."""


class VerifyError(AutoparError):
    """`autopar.compile(..., verify=True)` found the parallel program's first step differing from one process."""


class CheckpointError(AutoparError):
    """A checkpoint folder is missing, damaged, of another model, or of a newer format."""
