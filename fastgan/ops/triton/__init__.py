"""Triton kernels, one file per op family. Imported lazily by the ops (triton is optional)."""
