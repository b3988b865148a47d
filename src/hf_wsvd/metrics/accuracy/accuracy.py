"""Local evaluate module: accuracy (see hf_wsvd.metrics)."""

from hf_wsvd.metrics import metric_class

Metric = metric_class("accuracy")
