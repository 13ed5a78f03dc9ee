"""Architecture search: the ViT-ResNAS weight-sharing supernet and an evolutionary search under a MAC budget.

``Supernet(space)`` trains many sub-networks of a ``SearchSpace`` at once (multi-architecture sampling);
``evolutionary_search(space, score, budget)`` finds the best one under the budget; ``vitlab search`` runs both
and retrains the result (``vitlab.engine.search_run``).
"""

from .evolution import EvolutionConfig, SearchResult, crossover, evolutionary_search, mutate
from .supernet import Arch, SearchSpace, StageSpace, Supernet, masked_layer_norm

__all__ = [
    "Arch",
    "EvolutionConfig",
    "SearchResult",
    "SearchSpace",
    "StageSpace",
    "Supernet",
    "crossover",
    "evolutionary_search",
    "masked_layer_norm",
    "mutate",
]
