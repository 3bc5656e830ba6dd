"""cm-monitor: watch the geometry of a classifier while it trains.

The measurement core (:func:`cm_dimension`, :func:`boundary_dimension`) is pure PyTorch and runs on
any ``nn.Module``; the Lightning callbacks schedule it during training and log the results.
"""

from cm_monitor.cutting import REFERENCE_SETTINGS, OptimizerSettings
from cm_monitor.dimension import DimensionEstimate, boundary_dimension, cm_dimension
from cm_monitor.planes import default_dims, reference_dims

__version__ = "0.1.0"

__all__ = [
    "REFERENCE_SETTINGS",
    "DimensionEstimate",
    "OptimizerSettings",
    "__version__",
    "boundary_dimension",
    "cm_dimension",
    "default_dims",
    "reference_dims",
]
