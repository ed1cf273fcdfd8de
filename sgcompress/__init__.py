"""sgcompress: compress pretrained CNNs with self-grouping convolution (SG-CNN).

The Python API follows the pipeline: load -> analyze -> prune -> (fine-tune) -> report.
"""

from ._version import __version__
from .artifact import Artifact, load, load_artifact
from .config import PruneConfig
from .errors import SgCompressError
from .loading import LoadedModel, ModelSpec, load_model
from .pipeline import PruneResult, analyze, prune, report
from .plan import CompressionPlan

__all__ = [
    "__version__", "Artifact", "CompressionPlan", "LoadedModel", "ModelSpec", "PruneConfig", "PruneResult",
    "SgCompressError", "analyze", "load", "load_artifact", "load_model", "prune", "report",
]
