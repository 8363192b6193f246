"""The decode step, one package per stage, each with its pure-torch reference beside its Triton
kernel: :mod:`.stats` (page statistics), :mod:`.select` (page scoring and selection),
:mod:`.attend` (exact entmax over the selected pages), :mod:`.certify` (the support certificate).
:mod:`.step` strings them together, :mod:`.decode` is the eager entry, :mod:`.ops` the
``entmaxkv`` torch.library ops and :mod:`.tuning` the tuned launch configs per GPU."""
