"""The math of alpha-entmax: the exact row-wise entmax and its threshold (:mod:`.reference`, the
oracle), the Gaussian estimate tau-hat (:mod:`.gaussian`) and its generated truncated moments."""
