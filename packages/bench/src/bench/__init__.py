"""bench: exact, fast image-text retrieval benchmarks with tables and plots.

The metric functions live in :mod:`d2s.retrieval` (so the trainer can validate without
importing bench); this package adds datasets, model encoding, result files, comparison
tables / plots, the ``bench`` CLI and the ``bench-retrieval`` pipeline stage.
"""

from d2s.retrieval import (
    PROTOCOLS,
    ProtocolResult,
    RetrievalMetrics,
    evaluate_protocol,
    retrieval_metrics,
    retrieval_metrics_from_similarity,
)

from .api import (
    BenchResults,
    Embeddings,
    RetrievalSettings,
    embed_eval_set,
    evaluate_embeddings,
    load_embeddings,
    markdown_table,
    read_results,
    save_embeddings,
    write_results,
)
from .data import EvalSet, load_karpathy, load_shards

__all__ = [
    "PROTOCOLS",
    "BenchResults",
    "Embeddings",
    "EvalSet",
    "ProtocolResult",
    "RetrievalMetrics",
    "RetrievalSettings",
    "embed_eval_set",
    "evaluate_embeddings",
    "evaluate_protocol",
    "load_embeddings",
    "load_karpathy",
    "load_shards",
    "markdown_table",
    "read_results",
    "retrieval_metrics",
    "retrieval_metrics_from_similarity",
    "save_embeddings",
    "write_results",
]
