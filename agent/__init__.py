"""hpa-edge device side: reads stacks, runs the model bundle, publishes results.

Nothing here imports TensorFlow or scikit-learn; the workstation side (`export`) may import
from here, never the other way round.
"""

__version__ = "0.1.0"
