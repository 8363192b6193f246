"""Stage 4 of the decode step: exact entmax attention over the selected pages.
:mod:`.kernel` launches the Triton kernels of :mod:`.decode_kernels`."""
