"""The three extension points of docs/design.md ("Extending hf_wsvd"), each done as the page says:
a statistic (a registered collector), a method reading it (a registered weighting) and a pipeline
(a registered run), then a compression that uses all three."""

from __future__ import annotations

import torch

from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.pipelines import PIPELINES, get_pipeline, register_pipeline
from hf_wsvd.solvers import SOLVERS, LayerProblem
from hf_wsvd.solvers.weighting import Weighting, register_weighting
from hf_wsvd.statistics import COLLECTORS, GRAM, INPUT_STATISTICS, Collector, input_statistics, register_collector
from stats_worker import case_inputs

MEAN_SQUARE = "toy_mean_square"


def test_a_new_statistic_method_and_pipeline_compress_a_model():
    # 1. a statistic: E[x_j²] per input feature, an input statistic (no labels needed)
    @register_collector
    class MeanSquareCollector(Collector):
        name = MEAN_SQUARE

        @staticmethod
        def reduce(rows: torch.Tensor) -> torch.Tensor:
            return rows.square().sum(dim=0)

        def zeros(self, in_features, out_features, device):
            return torch.zeros(in_features, dtype=torch.float64, device=device)

    # 2. a method reading it: SVD of W·diag(√E[x²]) (activation-scaled, like asvd with α = ½ on x²)
    @register_weighting("toy_rms", needs=(MEAN_SQUARE,), description="SVD scaled by each input's RMS")
    def rms_weighting(problem: LayerProblem) -> Weighting:
        return Weighting(right=problem.toy_mean_square.double().sqrt().clamp_min(1e-8))

    # 3. a pipeline: the whole-model step, recording which layers and statistics it was given
    seen = []

    @register_pipeline("toy_whole_model")
    def run(job):
        seen.append((sorted(job.targets), sorted(job.needs)))
        return get_pipeline("whole_model")(job)

    try:
        model, loader, modules, _ = case_inputs("bert_classification", 6, 3)
        reference = input_statistics(model, loader, modules, {MEAN_SQUARE, GRAM}, show_progress=False)
        for name in modules:  # the collector is right: E[x²] is the Gram's diagonal
            assert torch.allclose(reference.get(name, MEAN_SQUARE), reference.get(name, GRAM).diagonal())
        model, report = compress(model, WSVDConfig(method="toy_rms", param_ratio=0.5, pipeline="toy_whole_model"),
                                 loader, show_progress=False)
        assert report.pipeline == "toy_whole_model" and report.allocation == "greedy"  # toy_rms has a spectrum
        assert seen == [(sorted(modules), [MEAN_SQUARE])]
        factorized = [name for name, module in model.named_modules() if isinstance(module, FactorizedLinear)]
        assert factorized and report.ranks
        for name in report.ranks:
            assert report.statistics.get(name, MEAN_SQUARE).shape == reference.get(name, MEAN_SQUARE).shape
    finally:
        del SOLVERS["toy_rms"], PIPELINES["toy_whole_model"]
        COLLECTORS.pop(MEAN_SQUARE)
        INPUT_STATISTICS.discard(MEAN_SQUARE)
