"""The experiment's networks, one file per network (as in wide-resnet.pytorch).

- `wide_resnet(depth, width, norm=...)`: WRN-d-k (Zagoruyko & Komodakis 2016).
- `make_norm(name, **kwargs)`: one normalization layer of the kind named
  `"batchnorm"`, `"renorm"` or `"keras-renorm"` (see `NORMS`).
"""

from models.norms import NORMS
from models.norms import make_norm
from models.wide_resnet import wide_resnet

__all__ = ["NORMS", "make_norm", "wide_resnet"]
