"""Named exceptions of the engine.

Every error a user can cause (a bad file, an unknown model family, a malformed failure spec) is raised as a
subclass of :class:`ForensicsError`, so the CLI can print one line and the GUI one dialog.
"""


class ForensicsError(Exception):
    """Base of every error the engine raises on purpose."""


class ModelLoadError(ForensicsError):
    """A model or tokenizer could not be loaded (missing path, offline hub id, unsafe format)."""


class UnknownArchitectureError(ForensicsError):
    """The model's family has no entry in the architecture table."""


class FailureSpecError(ForensicsError):
    """A failure specification string is malformed or does not fit the model."""


class BundleError(ForensicsError):
    """An incident bundle is missing, malformed, of an unknown version, or fails validation."""


class BundleFormatError(BundleError):
    """The file is not an HDF5 incident bundle (wrong format name, truncated, not HDF5)."""


class BundleVersionError(BundleError):
    """The bundle's schema version is not one this program reads."""


class BundleContentError(BundleError):
    """A group, dataset or attribute is missing or has the wrong type, shape or values."""


class RecordError(ForensicsError):
    """A run cannot be recorded as asked (an empty prompt, no tokens to generate)."""


class ReplayError(ForensicsError):
    """A replay could not be run (weights hash mismatch prevents loading, model unavailable)."""


class InterventionError(ForensicsError):
    """An intervention names a site or value that does not exist for this model or incident."""


class ScenarioError(ForensicsError):
    """A scenario name is unknown or its shipped assets are missing."""


class CertificateError(ForensicsError):
    """An RCA certificate is malformed, fails its schema, or cannot be built from the given results."""


class CCAError(ForensicsError):
    """A causal fix-set search or evaluation cannot run (no failure to fix, bad options, malformed result)."""


class CFError(ForensicsError):
    """Compression Forensics cannot run (no benign reference prompts, unknown statistic, malformed result)."""


class BaselineError(CFError):
    """A CF baseline database is missing, malformed, of an unknown version, or belongs to another model."""
