"""Shipped data: trained scenario weights (safetensors), word lists, the style sheet and icons.

A package only so that it installs with the project; it holds no code.
"""
