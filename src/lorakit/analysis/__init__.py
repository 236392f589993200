"""LoRA paper Section 7 analysis (Hu et al. 2021, arXiv:2106.09685): ``lorakit analyze``.

* :func:`subspace_similarity` — Eq. 4 grid φ(i, j) between two adapters' A (or B) matrices.
* :func:`weight_projection` — Table 7: ‖U_rᵀ W V_r‖_F, W's own top-r, random, amplification.
* :func:`analyze` / :func:`format_summary` — everything per module, JSON + PNGs.
* :func:`add_cli` — the ``analyze`` subcommand.
"""

from .cli import add_cli, run_cli
from .loading import (
    Adapter,
    AnalysisError,
    AnalysisMismatchError,
    LoraModule,
    load_adapter,
    load_base_weights,
)
from .report import analyze, format_summary
from .similarity import (
    chance_similarity,
    random_gaussian_similarity,
    similarity_report,
    subspace_basis,
    subspace_similarity,
)
from .weights import delta_svd, effective_rank, random_projection_norm, spectrum_report, weight_projection

__all__ = [
    "Adapter",
    "AnalysisError",
    "AnalysisMismatchError",
    "LoraModule",
    "add_cli",
    "analyze",
    "chance_similarity",
    "delta_svd",
    "effective_rank",
    "format_summary",
    "load_adapter",
    "load_base_weights",
    "random_gaussian_similarity",
    "random_projection_norm",
    "run_cli",
    "similarity_report",
    "spectrum_report",
    "subspace_basis",
    "subspace_similarity",
    "weight_projection",
]
