"""The ``embeddings`` modifier (``WSVDConfig.embeddings``): after the pipeline, factorize the input
embeddings at ``embedding_ratio`` with ``resolved_embedding_method`` (the maths:
``hf_wsvd.methods.embeddings``), its rows weighted by the ``token_counts`` statistic where the recipe
asks (given in the statistics, or counted on the data, each process its share). Solved by one
process and shared, like a layer."""

from __future__ import annotations

import torch

from ...blocks import offloaded
from ...methods.embeddings import embedding_rank, embedding_row_weights, input_embedding_name, tied_weights
from ...runtime.modeling_wsvd import relative_module_name
from ...solvers import LayerProblem, get_solver
from ...statistics import TOKEN_COUNTS, Statistics, token_counts
from ...swap import replace_embedding_with_factors
from ..step import Job, broadcast
from . import Modifier, register_modifier

SOURCE = 0  # the process that solves the embeddings


@register_modifier
class Embeddings(Modifier):
    name = "embeddings"
    field = "embeddings"

    def on_start(self, job: Job) -> None:
        name = input_embedding_name(job.model)
        embedding = job.model.get_submodule(name)
        if offloaded(embedding):
            raise ValueError(f"embeddings=True factorizes the input embeddings, which this model keeps offloaded "
                             f"({name!r}, by accelerate): keep them in memory (a device of their own in the "
                             "device_map, or outside cpu_offload), or leave embeddings off")
        tied = {target.removesuffix(".weight") for target, source in tied_weights(job.model).items()
                if source == f"{name}.weight"}
        untied = next((n for n in sorted(tied) if job.model.get_submodule(n).weight is not embedding.weight), None)
        if untied is not None:  # rebuilt on the factors, its own values would be lost
            raise ValueError(f"the model declares {untied!r} tied to the input embeddings {name!r} (config."
                             f"tie_word_embeddings), but holds a weight of its own there: tie them (model.tie_weights()) "
                             "or set config.tie_word_embeddings=False before compressing with embeddings=True")
        copies = [n for n, m in job.model.named_modules() if isinstance(m, torch.nn.Embedding) and m is not embedding
                  and m.weight is embedding.weight and n not in tied]
        if copies:  # rebuilt on the factors only where the model declares the tie: others would stay dense, untied
            raise ValueError(f"embeddings=True factorizes the input embeddings {name!r}, whose table is shared by "
                             f"{copies} without a declared tie: they would be untied and kept dense; leave embeddings "
                             "off for this model")
        embedding_rank(job.config, *embedding.weight.shape)

    def on_end(self, job: Job) -> dict[str, int]:
        """Factorize the input embeddings in place; their base-model-relative name → rank."""
        with job.timed("embeddings"):
            config, model = job.config, job.model
            full_name = input_embedding_name(model)
            weight = model.get_submodule(full_name).weight.detach()
            vocab_size, hidden = weight.shape
            rank = embedding_rank(config, vocab_size, hidden)
            solver = get_solver(config.resolved_embedding_method)
            name = relative_module_name(model, full_name)
            counts = None
            if config.embedding_weighting != "uniform":
                counts = job.statistics.get(name, TOKEN_COUNTS)
                if counts is None and job.data is not None:  # every process counts its share
                    counts = token_counts(job.read_data(), vocab_size, job.accelerator, job.show_progress, model)
                    job.statistics = job.statistics.merged(Statistics({name: {TOKEN_COUNTS: counts}}))
            row_weights = embedding_row_weights(config, counts)
            table = down = None
            if job.accelerator.process_index == SOURCE:
                problem = LayerProblem(name, weight.to(job.compute_dtype), rank, solver.options.from_recipe(config),
                                       row_weights=row_weights)
                table, down = solver.finite_solve(problem)
            if job.accelerator.num_processes > 1:  # float64: exact for every dtype a solver returns
                table = broadcast(job, table, (vocab_size, rank), torch.float64, SOURCE)
                down = broadcast(job, down, (rank, hidden), torch.float64, SOURCE)
            replace_embedding_with_factors(model, full_name, table, down.T)
        return {name: rank}
