"""The compiler front doors: marker capture of entmax calls (:mod:`.capture`), the pass library
(:mod:`.passes`), the torch.compile backend ``"entmaxkv"`` (:mod:`.backend`), the match report
(:mod:`.explain`) and the offline rewrite of an exported program (:mod:`.rewrite`)."""
