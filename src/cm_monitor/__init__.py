"""cm-monitor: watch the geometry of a classifier while it trains.

The measurement core (:func:`cm_dimension`, :func:`boundary_dimension`, :func:`relative_stability`,
:func:`local_elasticity`) is pure PyTorch and runs on any ``nn.Module``; the Lightning callbacks
(:class:`CMDimensionMonitor`, :class:`DiffeoStabilityMonitor`, :class:`ElasticityMonitor`) schedule
it during training and log the results.
"""

from cm_monitor._model import default_output_transform
from cm_monitor.analysis import analyze
from cm_monitor.callbacks import CMDimensionMonitor, DiffeoStabilityMonitor, ElasticityMonitor
from cm_monitor.cutting import REFERENCE_SETTINGS, OptimizerSettings
from cm_monitor.diffeo import StabilityEstimate, relative_stability
from cm_monitor.dimension import DimensionEstimate, boundary_dimension, cm_and_boundary_dimension, cm_dimension
from cm_monitor.elasticity import (
    ElasticityEstimate,
    class_contrast,
    linear_baseline_similarity,
    local_elasticity,
    spectral_cluster_score,
)
from cm_monitor.planes import default_dims, reference_dims

try:  # written by hatch-vcs from the git tag when the package is built or installed
    from cm_monitor._version import __version__
except ImportError:  # a source tree put on sys.path by hand: the installed metadata, if any
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("cm-monitor")
    except PackageNotFoundError:
        __version__ = "0+unknown"

__all__ = [
    "REFERENCE_SETTINGS",
    "CMDimensionMonitor",
    "DiffeoStabilityMonitor",
    "DimensionEstimate",
    "ElasticityEstimate",
    "ElasticityMonitor",
    "OptimizerSettings",
    "StabilityEstimate",
    "__version__",
    "analyze",
    "boundary_dimension",
    "class_contrast",
    "cm_and_boundary_dimension",
    "cm_dimension",
    "default_dims",
    "default_output_transform",
    "linear_baseline_similarity",
    "local_elasticity",
    "reference_dims",
    "relative_stability",
    "spectral_cluster_score",
]
