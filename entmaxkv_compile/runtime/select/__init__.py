"""Stage 3 of the decode step: score the pages and select them (top-k or Gaussian tau-hat).
:mod:`.reference` is the pure-torch oracle, :mod:`.kernel` its Triton launchers over
:mod:`.select_kernels` and :mod:`.tau_hat`."""
