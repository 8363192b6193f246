"""Tuned Triton launch configs: the per-GPU JSON store (:mod:`.tuned`, ``configs/``) and the
``autotune`` command that writes it (:mod:`.autotune`)."""
