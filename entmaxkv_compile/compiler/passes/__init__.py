"""Graph passes shared by the torch.compile backend and the offline rewrite.

``match_entmax`` finds attention weights (entmax marker, softmax, hand-written entmax confirmed
numerically), ``match_attention`` the q/k/v/scale/bias around them, ``match_kv_write`` the static
cache and this step's write, ``proofs`` (over ``symbolic``) proves a decode site's mask and write
index for every position, ``verify`` checks it on example inputs, ``analyze`` decides each site's
status and ``decode_rewrite`` applies the plan; ``guards`` and ``fallback`` are what the backend
checks at run time and runs when a check fails. ``ir`` normalizes Dynamo and aten spellings so
every matcher serves both graph flavours.
"""

from .analyze import BOOKKEEPING, NOT_ENTMAX, REFUSED, REWRITTEN, Plan, Site, analyze
from .decode_rewrite import RewriteResult, rewrite
from .static_state import STATS, StatsRegistry

__all__ = [
    "BOOKKEEPING", "NOT_ENTMAX", "REFUSED", "REWRITTEN", "Plan", "RewriteResult", "STATS", "Site",
    "StatsRegistry", "analyze", "rewrite",
]
