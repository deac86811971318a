"""The Model Forensics engine: everything that computes. Never imports Qt.

Record a failing run into an HDF5 incident bundle, replay it bit-identically, score layers for anomalous
computation (CF), search causal minimal fix sets (CCA), and assemble the RCA certificate data.
"""

__version__ = "0.1.0"
