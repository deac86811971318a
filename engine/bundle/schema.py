"""Constants of the incident bundle format, schema version 1 (spec: docs/bundle-format.md)."""

FORMAT_NAME = "model-forensics-incident"
SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)

ACTIVATION_SITES = ("resid_pre", "attn", "mlp", "resid_post")
STAT_SITES = ("resid_pre", "attn", "mlp", "resid_post", "head", "neuron")
RECORD_MODES = ("prompt", "generate", "classify")
#: ``/model@attn_implementation`` values a replay can load (``""``: the model's default)
ATTN_IMPLEMENTATIONS = ("", "eager", "sdpa")
#: upper bound on ``/environment@torch_num_threads`` (a larger count is a corrupt bundle, not a recording)
MAX_THREADS = 4096
PROMPT_SETS = ("counterpart", "variants", "variant_counterparts", "benign_reference", "benign_heldout",
               "benign_expected")

#: Filters for activation datasets: byte-shuffle + gzip level 4 is lossless (bit-exact replay from any layer stays
#: possible) and measured in benchmarks/record.py.
ACTIVATION_COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)
#: Tokens per chunk along the position axis (a chunk holds ``CHUNK_POSITIONS x d_model`` values).
CHUNK_POSITIONS = 64


def layer_group(i: int) -> str:
    return f"layer_{i:03d}"
