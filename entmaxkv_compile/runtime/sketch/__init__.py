"""Tier 2 of the certificate: a per-token int8 key sketch whose page upper bounds clear the pages
that the page-level bounds cannot. :mod:`.reference` is the pure-torch state and oracle,
:mod:`.kernel` its Triton launchers over :mod:`.sketch_kernels`."""
