"""Lightning callbacks that measure the model's geometry while it trains.

* :class:`CMDimensionMonitor`: class-manifold and boundary dimensions (cutting planes).
* :class:`DiffeoStabilityMonitor`: relative stability to diffeomorphisms R_f.
* :class:`ElasticityMonitor`: local elasticity.
* :class:`GeometryMonitor`: the shared base (anchors, schedule, logging, cost, state).
"""

from cm_monitor.callbacks.base import GeometryMonitor, Measurement
from cm_monitor.callbacks.cm import CMDimensionMonitor
from cm_monitor.callbacks.diffeo import DiffeoStabilityMonitor
from cm_monitor.callbacks.elasticity import ElasticityMonitor

__all__ = ["CMDimensionMonitor", "DiffeoStabilityMonitor", "ElasticityMonitor", "GeometryMonitor", "Measurement"]
