"""GPU-only branches checked on CPU against the rules the GPU code obeys (issue #10).

Each test emulates a library's rule from its source (``emulated_kernels.py``) or forces a
capability check, and fails on the code before the fix.
"""

import dataclasses

import pytest
import torch
from emulated_kernels import TeAttentionRules, batch_per_block, fused_softmax_kernels
from megatron.core.transformer.enums import AttnMaskType
from parity import hf_logits, hf_model, make_batch, megatron_inputs, tiny_config

from megatron_vlm import backend
from megatron_vlm.backbones import recipe, recipes_of
from megatron_vlm.backbones.common import FP8_TOKEN_MULTIPLE, te_fp8_gemm_problem
from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.conversion.mapping import load_hf_weights
from megatron_vlm.data.packing import PackedSequence, PackingConfig, collate
from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits


def _model(config, hf, precision=None):
    state = hf.state_dict()
    (model,) = build_model_chunks(config, ParallelConfig(), precision or PrecisionConfig())
    load_hf_weights([model], state.__getitem__, set(state), config, 0, 1)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(megatron_single_process):
    config = tiny_config()
    return config, hf_model(config)


# --- defect 1: the vision encoder read by Transformer Engine's attention -------------------------


def test_vision_attention_is_exact_under_transformer_engine_rules(tiny):
    """TE's fused/flash backends read a [N, 1, 1, S] padding mask as "the first n patches are
    real". With images narrower than the widest one that is false; the packed layout (one THD
    sequence per image) leaves nothing to interpret."""
    config, hf = tiny
    model = _model(config, hf)
    emulators = []
    for layer in model.vision.encoder.layers:
        attention = layer.self_attention
        emulators.append(TeAttentionRules(attention.config, attention.core_attention.attn_mask_type))
        attention.core_attention = emulators[-1]
    batch = make_batch(config)  # landscape, portrait, odd-sized and square images
    assert len({tuple(p.shape) for p in batch.pixel_mask}) == 1  # padded to one grid ...
    assert any(not m[:, -1].any() for m in batch.pixel_mask)  # ... with images narrower than it
    with torch.no_grad():
        image_tokens = model.encode_images(batch.pixel_values, batch.pixel_mask)
        reference = hf.model.get_image_features(batch.pixel_values[None], batch.pixel_mask[None].long())
        ours = gather_logits(model(**megatron_inputs(batch)), config.text.vocab_size)
    expected = reference.pooler_output[0].reshape(image_tokens.shape)
    assert (image_tokens - expected).abs().max() <= 1e-4 * expected.abs().max()
    valid = batch.padding.bool()
    assert (ours - hf_logits(hf, batch))[valid].abs().max() <= 1e-4
    assert all(call == "thd" for e in emulators for call in e.calls) and emulators[0].calls


# --- defect 2: Megatron's fused softmax on the local spec ---------------------------------------


def _packed_documents(config, rows: int = 2, seq_len: int = 48):
    """Rows of two documents each (text only): attention must stop at the document boundary."""
    generator = torch.Generator().manual_seed(5)
    sequences = []
    for _ in range(rows):
        first, second = 20, seq_len - 20
        tokens = torch.randint(1, 250, (seq_len,), generator=generator).tolist()
        sequences.append(PackedSequence(tokens, [0] * first + [1] * second, [], [0, 1]))
    packing = PackingConfig(seq_len=seq_len, image_token_id=config.image_token_id, image_seq_len=8)
    batch = collate(sequences, packing)
    return {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}


def test_decoder_mask_survives_megatrons_fused_softmax(tiny, monkeypatch):
    """With the fused-softmax extensions present (NGC containers), bf16 attention goes through
    Megatron's kernels. The causal kernel ignores the explicit mask, so packed documents would
    attend across their boundary; the decoder's mask type must select a kernel that applies it."""
    config, hf = tiny
    precision = PrecisionConfig(params_dtype="bfloat16", use_transformer_engine=False)
    reference = _model(config, hf, precision)
    monkeypatch.setattr(backend, "has_fused_softmax", lambda: True)  # the capability, forced
    fused = _model(config, hf, precision)
    assert fused.language_model.decoder.layers[
        0
    ].self_attention.core_attention.scale_mask_softmax.scaled_masked_softmax_fusion
    inputs = _packed_documents(config)
    kernels: list[str] = []
    with torch.no_grad():
        expected = gather_logits(reference(**inputs), config.text.vocab_size).float()
        with fused_softmax_kernels(kernels):
            got = gather_logits(fused(**inputs), config.text.vocab_size).float()
    assert kernels, "the fused kernels were not taken: the test would prove nothing"
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    assert set(kernels) == {"masked"}


def test_decoder_mask_type_selects_a_mask_honouring_kernel_at_training_shapes():
    """The dispatch rule itself, at the 8B decoder's shapes: 2048 tokens, bf16, 32 heads / TP."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.utils import attention_mask_func

    kernels: list[str] = []
    for use_te, tp in ((False, 1), (False, 4)):
        softmax = FusedScaleMaskSoftmax(
            input_in_fp16=False,
            input_in_bf16=True,
            attn_mask_type=recipe("text", "mistral").mask_type(use_te),
            scaled_masked_softmax_fusion=True,
            mask_func=attention_mask_func,
            softmax_in_fp32=True,
            scale=None,
        )
        mask = torch.ones(1, 1, 2048, 2048, dtype=torch.bool).triu(1)
        with fused_softmax_kernels(kernels):
            assert softmax.is_kernel_available(mask, 1, 32 // tp, 2048, 2048)
            scores = torch.randn(1, 32 // tp, 2048, 2048, dtype=torch.bfloat16)
            probs = softmax(scores, mask)
        assert probs[0, 0, 0, 1:].float().abs().max() == 0  # the first token sees only itself
    assert kernels == ["masked", "masked"]
    assert recipe("text", "mistral").mask_type(True) == AttnMaskType.arbitrary  # TE applies explicit masks only so
    assert batch_per_block(2048, 2048, 1, 32) == 4


# --- defect 4: FP8 GEMM shapes under Transformer Engine -----------------------------------------


def test_fp8_parts_follow_transformer_engines_gemm_rules():
    """TE's FP8 GEMMs need rows % 8 == 0, input width % 16 == 0, output width % 8 == 0. The 8B
    vision MLP (4304) splits into 2152 (TP2) and 1076 (TP4) per rank: not FP8-executable."""
    from megatron_vlm.models.fp8 import te_fp8_parts

    model = load_model_preset("idefics2-8b")
    by_tp = {tp: te_fp8_parts(model, ParallelConfig(tensor_parallel=tp)) for tp in (1, 2, 4, 8)}
    assert by_tp[1] == {"vision": None, "text": None}
    assert "mlp.linear_fc2" in by_tp[2]["vision"] and "2152" in by_tp[2]["vision"]
    assert "1076" in by_tp[4]["vision"]
    assert all(by_tp[tp]["text"] is None for tp in by_tp)
    assert te_fp8_gemm_problem(729 * 3, 1152, 3456) is not None  # 2187 patches: odd image count
    assert te_fp8_gemm_problem(1, 1152, 3456) is not None  # the one-patch blank image
    assert te_fp8_gemm_problem(2192, 1152, 3456) is None


def test_fp8_gemm_enumeration_matches_the_built_layers(tiny):
    """The recipes' GEMM shapes (what the FP8 rule is applied to) list every linear of a real layer."""

    config, hf = tiny
    model = _model(config, hf)
    for part, layer in (("vision", model.vision.encoder.layers[0]), ("text", model.language_model.decoder.layers[0])):
        built = {
            name: (module.weight.shape[1], module.weight.shape[0])
            for name, module in layer.named_modules()
            if hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 2
        }
        vision, _, text = recipes_of(config)
        assert built == (vision.gemms(config.vision, 1) if part == "vision" else text.gemms(config.text, 1))


def test_fp8_vision_tokens_are_padded_for_te(tiny, monkeypatch):
    """Under TE FP8 the packed vision sequence is padded to a multiple of 16 rows with a sequence
    of its own, so every vision GEMM sees aligned rows, whatever the images; results unchanged."""
    config, hf = tiny
    model = _model(config, hf)
    batch = make_batch(config, images_per_row=[[(56, 98)], [(98, 42), (60, 90)], [], [(14, 14)]])
    with torch.no_grad():
        plain = gather_logits(model(**megatron_inputs(batch)), config.text.vocab_size)
        model.vision.token_multiple = FP8_TOKEN_MULTIPLE
        rows = []
        hooks = [
            m.register_forward_hook(lambda _m, args, _o: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape))
            for m in model.vision.encoder.modules()
            if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
        ]
        padded = gather_logits(model(**megatron_inputs(batch)), config.text.vocab_size)
        for hook in hooks:
            hook.remove()
    assert rows and all(te_fp8_gemm_problem(r, c, 16) is None for r, c in rows)
    assert (padded - plain)[batch.padding.bool()].abs().max() <= 1e-5


def test_fp8_is_set_per_part_in_the_transformer_configs(monkeypatch):
    """With TE FP8 selected, the TransformerConfigs carry FP8 only for parts whose GEMMs can run it."""
    monkeypatch.setattr(backend, "fp8_backend", lambda requested: "te")
    model = load_model_preset("idefics2-8b")
    precision = PrecisionConfig(params_dtype="bfloat16", fp8="hybrid")
    for tp, vision_fp8 in ((1, "hybrid"), (4, None)):
        parallel = ParallelConfig(tensor_parallel=tp)
        vision, connector, text = recipes_of(model)
        assert vision.transformer_config(model.vision, parallel, precision, False).fp8 == vision_fp8
        assert text.transformer_config(model, parallel, precision, False).fp8 == "hybrid"
        assert connector.transformer_config(model, parallel, precision, False).fp8 is None


def test_sequence_parallel_only_in_the_decoder():
    model = load_model_preset("tiny")
    parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=True)
    precision = PrecisionConfig()
    vision, connector, text = recipes_of(model)
    assert text.transformer_config(model, parallel, precision, False).sequence_parallel
    assert not vision.transformer_config(model.vision, parallel, precision, False).sequence_parallel
    assert not connector.transformer_config(model, parallel, precision, False).sequence_parallel


def test_images_without_a_whole_patch_are_refused(tiny):
    config, hf = tiny
    model = _model(config, hf)
    batch = make_batch(config, images_per_row=[[(56, 56)]], seq_len=32)
    mask = batch.pixel_mask.clone()
    mask[:, 10:, :] = False  # fewer pixel rows than one patch
    with pytest.raises(ValueError, match="no complete 14x14 patch"):
        model(**{**megatron_inputs(dataclasses.replace(batch, pixel_mask=mask))})


# --- defect 3: the shipped 8B presets (LoRA) with Transformer Engine ----------------------------


def _machine_with_te(monkeypatch):
    """Force the capability checks to answer as on an H100 with TE installed."""
    monkeypatch.setattr(backend, "has_cuda", lambda: True)
    monkeypatch.setattr(backend, "has_transformer_engine", lambda: True)
    monkeypatch.setattr(backend, "has_fp8", lambda: True)


@pytest.mark.parametrize("preset", ["idefics2_8b_stage1.yaml", "idefics2_8b_stage2.yaml"])
def test_8b_stage_presets_start_with_transformer_engine(preset, monkeypatch):
    """The trainer's start-up checks accept the paper's LoRA recipe on TE's linears; the fused
    norm+linears get their adapters through the layer-norm output."""
    from megatron_vlm.config import EXAMPLES_DIR, load_run_config
    from megatron_vlm.training.preflight import check_run

    _machine_with_te(monkeypatch)
    run = load_run_config(EXAMPLES_DIR / preset)
    assert run.trainable.lora_rank > 0 and run.precision.use_transformer_engine is None
    plan = check_run(run, world_size=64)
    assert plan.transformer_engine
    for backbone in ("vision", "language"):
        assert plan.lora[backbone]["self_attention.linear_qkv"] == (
            "TELayerNormColumnParallelLinear via its layer-norm output"
        )
        assert plan.lora[backbone]["mlp.linear_fc2"] == "TERowParallelLinear"
    # And with FP8 turned on, as a user would: the vision MLP at TP4 stays in bf16, with the reason.
    plan = check_run(load_run_config(EXAMPLES_DIR / preset, ["precision.fp8=hybrid"]), world_size=64)
    assert plan.fp8_backend == "te" and plan.fp8_parts["text"] is None
    assert "1076" in plan.fp8_parts["vision"]


def test_startup_checks_name_every_problem(monkeypatch):
    from megatron_vlm.config import EXAMPLES_DIR, load_run_config
    from megatron_vlm.training.preflight import check_run

    _machine_with_te(monkeypatch)
    run = load_run_config(
        EXAMPLES_DIR / "idefics2_8b_stage1.yaml",
        [
            "parallel.sequence_parallel=true",
            "parallel.tensor_parallel=3",
            "precision.fp8=hybrid",
            "data.micro_batch_size=3",
        ],
    )
    with pytest.raises(ValueError) as error:
        check_run(run, world_size=48)
    message = str(error.value)
    assert "TP=3 must divide the text attention heads" in message
    assert "sequence length 2048 of the data mixture is not divisible by tensor_parallel=3" in message
    monkeypatch.setattr(backend, "fp8_backend", lambda requested: "torch")
    run = load_run_config(
        EXAMPLES_DIR / "tiny_cpu.yaml",
        ["parallel.sequence_parallel=true", "parallel.tensor_parallel=2", "precision.fp8=hybrid"],
    )
    with pytest.raises(ValueError, match="FP8 through torch .* does not support sequence parallelism"):
        check_run(run, world_size=2)


def test_te_decoder_rows_must_suit_fp8(monkeypatch, tmp_path):
    """A 100-token source gives 100-row decoder GEMMs: TE FP8 would stop at step 0."""
    from megatron_vlm.config import EXAMPLES_DIR, load_run_config
    from megatron_vlm.training.preflight import startup_problems

    _machine_with_te(monkeypatch)
    mixture = tmp_path / "odd.yaml"
    mixture.write_text("sources:\n  - {name: pairs, shards: pairs, weight: 1.0, seq_len: 100}\n")
    run = load_run_config(
        EXAMPLES_DIR / "tiny_cpu.yaml", ["precision.fp8=hybrid", "data.micro_batch_size=1", f"data.mixture={mixture}"]
    )
    _, problems = startup_problems(run, world_size=1)
    assert problems == [
        "FP8 (Transformer Engine): decoder GEMMs of a 100-token micro-batch of 1 (100 rows per rank): "
        "100 rows (tokens) not a multiple of 8; use sequence lengths that make it a multiple"
    ]
    run = load_run_config(
        EXAMPLES_DIR / "tiny_cpu.yaml", ["precision.fp8=hybrid", "data.micro_batch_size=2", f"data.mixture={mixture}"]
    )
    assert startup_problems(run, world_size=1)[1] == []


def test_lora_reads_every_linear_return_structure():
    """Megatron's linears return (out, bias); TE's fused norm+linear asked for its layer-norm output
    returns ((out, ln_out), bias) through Megatron's wrapper, or (out, bias, ln_out)."""
    from megatron_vlm.models.lora import _split_output, linear_kind, unadaptable

    out, bias, ln = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    assert _split_output((out, None)) == (out, None, None)
    assert _split_output(((out, ln), None)) == (out, None, ln)
    assert _split_output((out, bias, ln)) == (out, bias, ln)
    assert linear_kind("TELayerNormColumnParallelLinear").layernorm_input
    assert linear_kind("TERowParallelLinear").row_parallel
    assert unadaptable({"mlp.linear_fc1": "TELayerNormMLP"}) == [
        "mlp.linear_fc1 is a TELayerNormMLP, which LoRA cannot adapt (supported: ColumnParallelLinear, "
        "RowParallelLinear, TEColumnParallelLinear, TELayerNormColumnParallelLinear, TERowParallelLinear)"
    ]
