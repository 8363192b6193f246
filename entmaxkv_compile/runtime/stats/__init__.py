"""Stage 2 of the decode step: per-page key statistics (min, max, mean, second moment), kept
incrementally. :mod:`.reference` is the pure-torch state and oracle, :mod:`.kernel` its Triton twin."""
