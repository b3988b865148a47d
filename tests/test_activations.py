"""Activation statistics: equal to a direct computation over real tokens, and across processes."""

from __future__ import annotations

import pytest
import torch
import transformers

from stats_worker import DISTRIBUTED_CASES, activations_of, case_inputs

from hf_wsvd.statistics import default_accelerator


def _direct(model, loader, modules, device):
    """Inputs of every target captured by plain hooks, padding dropped, statistics in float64."""
    captured = {name: [] for name in modules}
    masks = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: captured[n].append(args[0].detach()))
               for name, m in modules.items()]
    with torch.no_grad():
        for batch in loader:
            masks.append(batch["attention_mask"].bool().to(device))
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    for h in handles:
        h.remove()
    result = {}
    for name, inputs in captured.items():
        x = torch.cat([i[m].double() for i, m in zip(inputs, masks)])
        result[name] = ((x.T @ x / len(x)).cpu(), x.abs().mean(0).cpu(), len(x))
    return result


def test_statistics_equal_a_direct_computation():
    model, loader, modules, _ = case_inputs("llama_causal_lm", 5, 2)
    device = default_accelerator().device  # where the statistics are computed: the direct maths there too
    stats = activations_of(model.to(device), loader, modules)
    direct = _direct(model, loader, modules, device)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in loader)
    assert real_tokens < 5 * 6  # some padding was excluded
    for name, (gram, mean_abs, count) in direct.items():
        assert stats[name]["tokens"] == count == real_tokens
        assert stats[name]["gram"].dtype == torch.float64
        # Each batch's products in float64 on the CPU; on a GPU in float32 (summed in float64), so
        # there the float32 rounding of a batch's products is the bound.
        exact = device.type == "cpu"
        for key, value in (("gram", gram), ("mean_abs", mean_abs)):
            rtol, atol = (1e-10, 1e-12) if exact else (1e-5, 1e-5 * value.abs().max().item())
            torch.testing.assert_close(stats[name][key], value, rtol=rtol, atol=atol)
    assert all(not m._forward_pre_hooks for m in modules.values())


def test_two_processes_equal_one(two_process_results, one_process_result):
    for case in DISTRIBUTED_CASES:
        single = one_process_result[f"{case}/activations"]
        for result in two_process_results:
            multi = result[f"{case}/activations"]
            assert set(multi) == set(single)
            for name, stats in single.items():
                assert multi[name]["tokens"] == stats["tokens"]
                # Float64 sums of float32 activations: equal up to the summation order, which the
                # split into shards and the thread count change (observed up to ~1e-5 relative on
                # near-cancelling off-diagonal entries), so the bound is relative to the largest entry.
                for key in ("gram", "mean_abs"):
                    scale = stats[key].abs().max().item()
                    torch.testing.assert_close(multi[name][key], stats[key], rtol=1e-6, atol=1e-6 * scale)


def test_products_keep_float64_activations_in_float64_off_the_cpu():
    """Off the CPU (the meta device stands in for a GPU here) float32 activations multiply in float32,
    float64 ones in float64: a float64 model's statistics keep its precision on a GPU."""
    from hf_wsvd.statistics.passes import exact_16bit_products

    for tensor, expected in ((torch.zeros(2), torch.float64), (torch.zeros(2, device="meta"), torch.float32),
                             (torch.zeros(2, dtype=torch.float64, device="meta"), torch.float64)):
        with exact_16bit_products(tensor) as dtype:
            assert dtype == expected, tensor


def test_an_encoder_decoder_model_calibrated_on_labels_gets_its_decoder_inputs_built_from_them():
    """T5 builds its decoder's inputs from the labels in its own forward, which the activation pass
    calls without labels: they are built there as T5 would."""
    import tiny
    from hf_wsvd import FactorizedLinear, WSVDConfig, compress

    model = tiny.build("t5", "AutoModelForSeq2SeqLM")
    ids = torch.randint(5, tiny.VOCAB_SIZE, (4, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, :5]}
    compress(model, WSVDConfig(method="whiten", param_ratio=0.5), [batch], show_progress=False)
    decoder = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear) and n.startswith("decoder.")]
    assert decoder


def test_an_encoder_decoder_model_s_decoder_counts_its_own_real_positions():
    """Encoder and decoder of one length: the decoder's modules count the positions whose label is not
    -100, cross-attention's keys and values the encoder's real tokens, and the encoder its own."""
    import tiny
    from hf_wsvd.statistics import GRAM, input_statistics
    from hf_wsvd.targets import select_targets

    model = tiny.build("t5", "AutoModelForSeq2SeqLM")
    ids = torch.randint(5, tiny.VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # 13 real encoder tokens
    labels = ids.clone()
    labels[0, -2:], labels[1, -5:] = -100, -100  # 9 real decoder positions
    modules = {name: model.get_submodule(full) for name, full in select_targets(model).items()}
    seen = {}
    cross_k = modules["decoder.block.1.layer.1.EncDecAttention.k"]
    handle = cross_k.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach().clone()))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    stats = input_statistics(model, [batch], modules, [GRAM], show_progress=False)
    handle.remove()
    for name in modules:
        cross_attention_input = ".EncDecAttention.k" in name or ".EncDecAttention.v" in name
        expected = 13 if name.startswith("encoder.") or cross_attention_input else 9
        assert stats.tokens[name] == expected, name
    rows = seen["x"][mask.bool()].double()
    torch.testing.assert_close(stats.values["decoder.block.1.layer.1.EncDecAttention.k"][GRAM], rows.T @ rows / 13)


def _encoder_decoder(kind: str):
    """A tiny encoder-decoder model: BART fed as ``DataCollatorForSeq2Seq`` feeds it (decoder inputs
    given), M2M100 (only its forward builds decoder inputs from labels), or a BERT → BERT
    ``EncoderDecoderModel`` whose wider decoder reads the encoder's output through a projection."""
    torch.manual_seed(0)
    if kind == "bert2bert":
        common = dict(vocab_size=64, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
        encoder = transformers.BertConfig(hidden_size=32, intermediate_size=64, **common)
        decoder = transformers.BertConfig(hidden_size=48, intermediate_size=64, is_decoder=True, add_cross_attention=True,
                                          **common)
        config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id, config.pad_token_id = 2, 0
        return transformers.EncoderDecoderModel(config=config)
    config_class = transformers.BartConfig if kind == "bart" else transformers.M2M100Config
    config = config_class(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                          pad_token_id=0, decoder_start_token_id=2)
    return transformers.AutoModelForSeq2SeqLM.from_config(config)


@pytest.mark.parametrize("kind", ["bart", "m2m100", "bert2bert"])
def test_an_encoder_decoder_model_s_statistics_count_the_real_positions_of_each_side(kind):
    """Whatever builds the decoder's inputs (the batch, the model's forward) and however the decoder
    reads the encoder (directly, through a projection), its layers count the positions whose label is
    not -100, cross-attention's keys and values the encoder's real tokens."""
    from hf_wsvd.statistics import GRAM, input_statistics
    from hf_wsvd.targets import select_targets

    model = _encoder_decoder(kind)
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # 13 real encoder tokens
    labels = ids.clone()
    labels[0, -2:], labels[1, -5:] = -100, -100  # 9 real decoder positions
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if kind == "bart":
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
    modules = {name: model.get_submodule(full) for name, full in select_targets(model).items()}
    stats = input_statistics(model, [batch], modules, [GRAM], show_progress=False)
    cross = ("encoder_attn.k_proj", "encoder_attn.v_proj", "crossattention.self.key", "crossattention.self.value")
    assert any(name.endswith(cross) for name in modules)
    for name in modules:
        encoder_side = name.startswith(("encoder.", "model.encoder.")) or name.endswith(cross)
        assert stats.tokens[name] == (13 if encoder_side else 9), name


def _padded_batch() -> dict:
    """Two rows of 8 ids: 13 real encoder tokens (the second row padded by 3), 9 real labels."""
    ids = torch.randint(5, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.clone()
    labels[0, -2:], labels[1, -5:] = -100, -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tokens(model, batch) -> dict[str, int]:
    from hf_wsvd.statistics import GRAM, input_statistics
    from hf_wsvd.targets import select_targets

    modules = {name: model.get_submodule(full) for name, full in select_targets(model).items()}
    return input_statistics(model, [batch], modules, [GRAM], show_progress=False).tokens


@pytest.mark.parametrize("case", ["no labels", "classifier", "copied encoder states"])
def test_bart_s_decoder_counts_its_shifted_ids_and_cross_attention_the_encoder_s_tokens(case):
    """BART shifts its input ids into its decoder where no labels give it targets (and always as a
    classifier, whose labels are classes): its decoder counts the attention mask shifted with them
    (14 positions). Encoder states copied on their way (a model dispatched over devices) still count
    as the encoder's (13)."""
    model = _encoder_decoder("bart")
    batch = _padded_batch()
    if case == "no labels":
        del batch["labels"]
    elif case == "classifier":
        config = model.config
        config.num_labels = 2
        model = transformers.BartForSequenceClassification(config)
        batch["labels"] = torch.tensor([0, 1])
        batch["input_ids"][0, 7], batch["input_ids"][1, 4] = 2, 2  # its pooling reads each row's last eos
    else:
        batch["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        model.model.decoder.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"].clone()}),
            with_kwargs=True)
    tokens = _tokens(model, batch)
    for name, count in tokens.items():
        encoder_side = name.startswith(("encoder.", "model.encoder.")) or "encoder_attn.k_proj" in name \
            or "encoder_attn.v_proj" in name
        assert count == (13 if encoder_side else 9 if case == "copied encoder states" else 14), name


def test_a_decoder_that_no_label_reaches_is_named():
    model = _encoder_decoder("bart")
    batch = {**_padded_batch(), "labels": torch.full((2, 8), -100)}
    with pytest.raises(ValueError, match=r"no token of the calibration data reached \['decoder\..*label is not -100") \
            as error:
        _tokens(model, batch)
    # the data is at fault: no list of every decoder layer to exclude
    assert len(str(error.value)) < 600 and "names, such as" in str(error.value), str(error.value)


def test_the_activation_pass_records_no_gradient_graph():
    """Its outputs are read, never differentiated: a graph would hold every activation until the batch ends."""
    import tiny
    from hf_wsvd.statistics import input_statistics

    model = tiny.build("llama")
    seen = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda module, args, output: seen.append((torch.is_grad_enabled(), output.requires_grad)))
    batch = tiny.inputs("llama")
    input_statistics(model, [batch], {"down": model.model.layers[0].mlp.down_proj}, ["gram"], show_progress=False)
    handle.remove()
    assert seen == [(False, False)]
