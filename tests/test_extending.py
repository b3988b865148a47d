"""The four extension points of docs/design.md ("Extending hf_wsvd"), each done as the page says:
a statistic (a registered collector), a method reading it (a registered weighting) and a pipeline
(a registered run), then a compression that uses all three; and a modifier (a registered
``Modifier``) called through the sequential walk."""

from __future__ import annotations

import torch

import tiny
from hf_wsvd import FactorizedLinear, WSVDConfig, compress
from hf_wsvd.pipelines import PIPELINES, get_pipeline, register_pipeline
from hf_wsvd.pipelines.modifiers import MODIFIERS, Modifier, register_modifier
from hf_wsvd.solvers import SOLVERS, LayerProblem
from hf_wsvd.solvers.weighting import Weighting, register_weighting
from hf_wsvd.statistics import COLLECTORS, GRAM, INPUT_STATISTICS, Collector, input_statistics, register_collector
from hf_wsvd.statistics.names import CROSS
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


def test_a_new_modifier_is_called_through_the_sequential_walk():
    # 4. a modifier: every hook of the sequential walk, recorded; its ``observed`` layers' statistics
    # reach its ``compress``, and the block's dense targets its ``on_block_end`` (compensation's).
    calls = []

    @register_modifier
    class Recorder(Modifier):
        name = "toy_recorder"

        @classmethod
        def enabled(cls, config) -> bool:
            return config.method == "whiten"

        def on_walk_start(self, job, inputs):
            calls.append(("walk", len(inputs)))

        def on_block_start(self, job, block):
            calls.append(("start", block.index, block.reference is not None))

        def observed(self, names):
            return [names[0]]

        def compress(self, job, names, stats, block):
            assert stats.get(names[0], GRAM) is not None and stats.get(names[0], CROSS) is not None
            calls.append(("compress", block.index, tuple(names)))

        def on_block_end(self, job, block):
            calls.append(("end", block.index, block.targets is not None))

        def on_end(self, job):
            calls.append(("done",))
            return {}

    data = [{"input_ids": torch.arange(7, 23).view(2, 8) + i, "attention_mask": torch.ones(2, 8, dtype=torch.long)}
            for i in range(3)]
    recipe = WSVDConfig(method="whiten", param_ratio=0.5, compensate=True, mlp_pruning=False, block_refine_steps=0,
                        allocation="uniform", rank_multiple=2, compute_dtype="float64")
    try:
        assert "toy_recorder" in MODIFIERS
        model, report = compress(tiny.build("llama"), recipe, data, show_progress=False)
    finally:
        del MODIFIERS["toy_recorder"]
    plain, _ = compress(tiny.build("llama"), recipe, data, show_progress=False)
    for index in range(2):  # q/k/v, o, gate/up, down: four stages a block, in the order the block runs them
        stages = [c[2] for c in calls if c[:2] == ("compress", index)]
        assert [len(s) for s in stages] == [3, 1, 2, 1] and stages[0][0].endswith("q_proj"), stages
    assert calls[0] == ("walk", 3) and calls[-1] == ("done",)
    assert [c for c in calls if c[0] in ("start", "end")] == [("start", 0, True), ("end", 0, True),
                                                               ("start", 1, True), ("end", 1, True)]
    # Recording changed nothing: the same compressed model as without the modifier.
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert report.ranks and "toy_recorder" not in MODIFIERS
