"""The experiment's networks, one file per network (as in wide-resnet.pytorch):
`wide_resnet` (WRN-d-k) and `make_norm`, a normalization layer by name."""

from models.norms import NORMS
from models.norms import make_norm
from models.wide_resnet import wide_resnet

__all__ = ["NORMS", "make_norm", "wide_resnet"]
