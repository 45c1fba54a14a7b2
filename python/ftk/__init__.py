"""Python glue for the ftk command-line tools.

ftk.flwr   Flower Message-API strategies whose train aggregation is fed-aggregate
ftk.trace  router top-k ids from PyTorch MoE models, in route-hist's layout

Nothing here re-implements the tools' math: arrays go to files in the tools'
input formats and the binaries do the work (see ftk.bin for how they are found).
"""

from .bin import BinaryNotFound, find_binary

__all__ = ["BinaryNotFound", "find_binary"]
__version__ = "0.1.0"
