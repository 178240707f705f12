"""Triton kernels and their host launchers. Imported lazily by resnet_fast.ops (importing
triton costs time, and TRITON_INTERPRET must be set before the first import to take effect).
"""
