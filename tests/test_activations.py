"""Activation statistics: equal to a direct computation over real tokens, and across processes."""

from __future__ import annotations

import torch

from stats_worker import DISTRIBUTED_BATCH, DISTRIBUTED_CASES, DISTRIBUTED_EXAMPLES, case_inputs
from hf_wsvd.importance import collect_activation_stats


def _direct(model, loader, modules):
    """Inputs of every target captured by plain hooks, padding dropped, statistics in float64."""
    captured = {name: [] for name in modules}
    masks = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: captured[n].append(args[0].detach()))
               for name, m in modules.items()]
    with torch.no_grad():
        for batch in loader:
            masks.append(batch["attention_mask"].bool())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for h in handles:
        h.remove()
    result = {}
    for name, inputs in captured.items():
        x = torch.cat([i[m].double() for i, m in zip(inputs, masks)])
        result[name] = (x.T @ x / len(x), x.abs().mean(0), len(x))
    return result


def test_statistics_equal_a_direct_computation():
    model, loader, modules, _ = case_inputs("llama_causal_lm", 5, 2)
    stats = collect_activation_stats(model, loader, modules, show_progress=False)
    direct = _direct(model, loader, modules)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    assert real_tokens < 5 * 6  # some padding was excluded
    for name, (gram, mean_abs, count) in direct.items():
        assert stats.tokens[name] == count == real_tokens
        assert stats.gram[name].dtype == torch.float64
        torch.testing.assert_close(stats.gram[name], gram, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats.mean_abs[name], mean_abs, rtol=1e-10, atol=1e-12)
    assert all(not m._forward_pre_hooks for m in modules.values())


def test_two_processes_equal_one(two_process_results):
    for case in DISTRIBUTED_CASES:
        model, loader, modules, _ = case_inputs(case, DISTRIBUTED_EXAMPLES, DISTRIBUTED_BATCH)
        single = collect_activation_stats(model, loader, modules, show_progress=False)
        for result in two_process_results:
            multi = result[f"{case}/activations"]
            assert multi.tokens == single.tokens
            for name in single.gram:
                torch.testing.assert_close(multi.gram[name].cpu(), single.gram[name], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(multi.mean_abs[name].cpu(), single.mean_abs[name], rtol=1e-9, atol=1e-12)
