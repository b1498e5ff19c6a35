"""The experiment's networks, one file per network (as in wide-resnet.pytorch):
`models.wide_resnet.wide_resnet` (WRN-d-k) and `models.norms.make_norm`, a
normalization layer by name. The norms' names live here, where reading them
starts no framework (plot.py reads them)."""

NORMS = ("batchnorm", "renorm", "keras-renorm")
