"""Triton kernels (optional). Empty until the 8-bit / fused-update work lands.

`import memopt` never imports triton; this package will hold one availability check and the dispatch.
"""
