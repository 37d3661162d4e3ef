"""Quantised source formats (FP8 blocks, MXFP4) that loading reads and export writes back.

`conversion.families` binds every parameter to its HF keys; this package sits above it: loading binds
through `read_bindings`, which applies a checkpoint's quantised layout to the family's bindings.
"""
