"""Stage 5 of the decode step: the support certificate of a selection and the bound of the mass
it may drop. :mod:`.kernel` is the Triton twin of the reference."""
