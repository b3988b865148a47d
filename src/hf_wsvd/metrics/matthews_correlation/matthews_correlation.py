"""Local evaluate module: matthews_correlation (see hf_wsvd.metrics)."""

from hf_wsvd.metrics import metric_class

Metric = metric_class("matthews_correlation")
