"""The HDF5 incident bundle, schema v1 (specification: ``docs/bundle-format.md``).

``write_bundle(path, incident)`` writes atomically; ``open_bundle(path)`` returns a lazy, validated
:class:`IncidentBundle`. No pickle anywhere: strings are UTF-8 datasets, numbers are plain numeric arrays, embedded
weights are safetensors bytes.
"""

from .reader import IncidentBundle, open_bundle
from .schema import FORMAT_NAME, SCHEMA_VERSION
from .writer import (BenignRecord, FailureRecord, Incident, ModelInfo, RunRecord, TokenizerInfo, write_bundle)

__all__ = ["IncidentBundle", "open_bundle", "write_bundle", "Incident", "ModelInfo", "TokenizerInfo",
           "RunRecord", "FailureRecord", "BenignRecord", "FORMAT_NAME", "SCHEMA_VERSION"]
