"""GPU-only branches checked on CPU against the rules the GPU code obeys (issue #10).

Each test emulates a library's rule from its source (``emulated_kernels.py``) or forces a
capability check, and fails on the code before the fix.
"""

import dataclasses
import inspect

import pytest
import torch
from emulated_kernels import TeAttentionRules, te_decoder_attention_rules, varlen_attention_rules
from parity import document_errors, hf_logits, hf_model, make_batch, megatron_inputs, packed_documents, tiny_config

from megatron_vlm import backend
from megatron_vlm.backbones import recipes_of
from megatron_vlm.backbones.common import FP8_TOKEN_MULTIPLE, te_fp8_gemm_problem
from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.conversion.mapping import load_hf_weights
from megatron_vlm.models.idefics2 import build_model_chunks, decoder_token_multiple, gather_logits


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


# --- the decoder's packed documents on Transformer Engine and on torch's varlen flash kernel -----


@pytest.fixture(scope="module")
def windowed(megatron_single_process):
    """A tiny model whose 8-token sliding window binds inside make_batch's 43-48-token documents."""
    config = tiny_config(sliding_window=8)
    return config, hf_model(config)


def test_decoder_documents_are_exact_under_transformer_engine_rules(windowed):
    """Under TE the decoder's attention is TE's THD kernel: Megatron turns ``causal`` into
    ``padding_causal`` and TE keeps the config's ``window_size`` band. Documents packed two per row
    with padding after them equal transformers running each document alone."""
    config, hf = windowed
    model = _model(config, hf)
    emulators = []
    for layer in model.language_model.decoder.layers:
        attention = layer.self_attention
        emulators.append(te_decoder_attention_rules(attention.config, layer.layer_number))
        attention.core_attention = emulators[-1]
    assert model.language_model.decoder.layers[0].self_attention.config.window_size == (7, 0)
    documents = make_batch(config)
    inputs, lengths = packed_documents(documents)
    with torch.no_grad():
        ours = gather_logits(model(**inputs), config.text.vocab_size)
    assert max(document_errors(ours, hf_logits(hf, documents), lengths)) <= 1e-4
    assert all(call == "thd" for e in emulators for call in e.calls) and emulators[0].calls


@pytest.fixture(scope="module")
def unwindowed(megatron_single_process):
    config = tiny_config()
    return config, hf_model(config)


@pytest.mark.parametrize("torch_version", ["2.10", "2.11", "2.13"])
def test_decoder_documents_are_exact_under_torchs_varlen_kernel_rules(request, monkeypatch, torch_version):
    """On a GPU without TE, the local spec's attention is one call of torch's varlen flash kernel per
    layer: the decoder's causal with int32 ``cu_seqlens``, the vision encoder's per image without a
    mask. Its signature differs by torch version (issue #27: every arguments passed by keyword it
    takes, ``scale`` on 2.10 crashed the first vision layer): the window as (left, 0) where the
    signature has one (2.11+; on 2.10 a windowed model keeps the SDPA path), GQA by ``enable_gqa``
    where it exists (2.13), the keys repeated elsewhere. With the kernel's documented rules emulated,
    packed documents equal transformers document by document."""
    from megatron_vlm.backbones import attention as packed_attention

    windowed = torch_version != "2.10"  # 2.10's kernel has no window: such a model does not call it
    config, hf = request.getfixturevalue("windowed" if windowed else "unwindowed")
    model = _model(config, hf)
    calls: list[dict] = []
    rules = varlen_attention_rules(calls, torch_version)
    signature = frozenset(inspect.signature(rules).parameters)
    monkeypatch.setattr(packed_attention, "_varlen_attention", lambda: (rules, signature))
    # The kernel's own conditions but CUDA and 16-bit: a window only where the signature takes one.
    monkeypatch.setattr(
        packed_attention,
        "use_varlen_kernel",
        lambda query, dropout, window: window is None or "window_size" in signature,
    )
    documents = make_batch(config)
    inputs, lengths = packed_documents(documents)
    with torch.no_grad():
        ours = gather_logits(model(**inputs), config.text.vocab_size)
    assert max(document_errors(ours, hf_logits(hf, documents), lengths)) <= 1e-4
    assert len(calls) == config.vision.num_layers + config.text.num_layers
    decoder = (torch.int32, (7, 0) if windowed else (-1, 0), torch_version == "2.13")
    assert {(c["cu_dtype"], c["window_size"], c["gqa"]) for c in calls} == {
        (torch.int32, (-1, -1), False),  # the vision encoder: images of its own heads, no mask
        decoder,
    }
    assert calls[-1]["max_q"] == 48


def test_a_scale_the_varlen_kernel_cannot_take_goes_into_the_queries(megatron_single_process, monkeypatch):
    """torch 2.10's kernel has no ``scale``: an attention with another scale than 1/sqrt(head_dim)
    scales its queries instead, and equals the per-sequence SDPA path."""
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vlm.backbones import attention as packed_attention

    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8, attention_dropout=0.0
    )
    attention = packed_attention.PackedSequenceAttention(config, 1, AttnMaskType.causal, "self", softmax_scale=0.11)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(9, heads, 8, generator=generator) for heads in (4, 2, 2))
    params = packed_attention.packed_seq_params(torch.tensor([4, 5]))
    reference = attention(query, key, value, None, packed_seq_params=params)
    calls: list[dict] = []
    rules = varlen_attention_rules(calls, "2.10")
    monkeypatch.setattr(
        packed_attention, "_varlen_attention", lambda: (rules, frozenset(inspect.signature(rules).parameters))
    )
    monkeypatch.setattr(packed_attention, "use_varlen_kernel", lambda query, dropout, window: True)
    assert (attention(query, key, value, None, packed_seq_params=params) - reference).abs().max() <= 1e-5 and calls


def test_vision_position_ids_do_not_depend_on_the_device(monkeypatch):
    """SigLIP's position buckets: the boundaries made where the pixels are would follow CUDA's
    float32 arange, which shifts the position ids of some grids (9, 18 and 27 patches on a 27-patch
    side, issue #27); made on the host they are transformers' for every grid."""
    from emulated_kernels import CudaArange
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    from megatron_vlm.backbones import siglip

    side = 27
    masks = [torch.ones(1, rows, cols, dtype=torch.bool) for rows in range(1, side + 1) for cols in (1, rows)]
    # transformers' ids: what its embeddings look up in the position table for each grid.
    embeddings = Idefics2VisionEmbeddings(Idefics2VisionConfig(hidden_size=8, image_size=side * 14, patch_size=14))
    looked_up = []
    embeddings.position_embedding.register_forward_hook(lambda module, args, output: looked_up.append(args[0]))
    with torch.no_grad():
        for mask in masks:
            embeddings(torch.zeros(1, 3, mask.shape[1] * 14, mask.shape[2] * 14), mask)
    expected = [siglip.bucketized_position_ids(mask, side) for mask in masks]
    differ = [
        mask.shape[1:] for mask, ours, hf in zip(masks, expected, looked_up, strict=True) if not torch.equal(ours, hf)
    ]
    assert not differ, f"position ids other than transformers' on grids {differ}"
    monkeypatch.setattr(siglip, "torch", CudaArange())
    shifted = [
        rows
        for mask, ids in zip(masks, expected, strict=True)
        if not torch.equal(siglip.bucketized_position_ids(mask, side), ids)
        for rows in [mask.shape[1]]
    ]
    assert not shifted, f"grids of {sorted(set(shifted))} rows get other position ids on a GPU"


@pytest.mark.multiprocess
def test_lora_on_te_layernorm_linear_gets_the_single_process_gradients_under_sequence_parallelism(tmp_path):
    """LoRA on TE's fused norm + column-parallel linear at TP2 (issue #27): the layer's layer-norm
    output is returned as this rank's slice and the adapter gathers it, so under both emulated TE
    backward rules (2.0-2.3 add a gathered output's gradient before the reduce-scatter, counting it
    TP times; 2.4+ drop it) the input, norm, weight and adapter gradients equal the single-process
    model's, with sequence parallelism and without."""
    import json

    from parity import run_torchrun

    run_torchrun("lora_te_sp_worker.py", 2, ["--out", str(tmp_path)])
    results = json.loads((tmp_path / "result.json").read_text())
    assert set(results) == {"sp-te2.3", "sp-te2.10", "tp-te2.3", "tp-te2.10"}
    for case, result in results.items():
        assert not result["gathered_output_asked"], case
        assert result["largest"] > 1 and max(result["errors"].values()) <= 1e-5, (case, result)


def test_the_decoder_rope_runs_te_fused_kernel_with_each_tokens_angles(tiny, monkeypatch):
    """With Transformer Engine the decoder's RoPE goes through TE's fused kernel (``apply_rope_fusion``,
    issue #27): the packed tokens as one [tokens, 1, heads, d] sequence, each with its own angles.
    With TE's rule emulated, documents packed two per row equal transformers running each alone."""
    from emulated_kernels import te_fused_rope_rules
    from megatron.core.models.common.embeddings import rope_utils

    config, hf = tiny
    model = _model(config, hf)
    calls: list = []
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", te_fused_rope_rules(calls))
    monkeypatch.setattr(model.language_model.config, "apply_rope_fusion", True)  # what TE's presence sets
    documents = make_batch(config)
    inputs, lengths = packed_documents(documents)
    with torch.no_grad():
        ours = gather_logits(model(**inputs), config.text.vocab_size)
    assert max(document_errors(ours, hf_logits(hf, documents), lengths)) <= 1e-4
    assert len(calls) == 2 * config.text.num_layers and all(shape[1] == 1 for shape in calls)  # q and k


def test_the_decoder_reads_nothing_back_per_layer(megatron_single_process, monkeypatch):
    """RoPE over the packed documents comes per token, from the positions (issue #27): Megatron's THD
    RoPE read ``cu_seqlens`` back on the host for q and k in every layer (a device sync each on a
    GPU). The host reads of a forward (``tolist`` / ``item``) no longer grow with the decoder's
    layers. Megatron's RNG tracker compares host RNG states in every attention (CPU tensors, no
    device sync): those are not counted."""
    import dataclasses
    import sys

    reads = {}
    for layers in (2, 4):
        base = tiny_config()
        config = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=layers))
        (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
        inputs = megatron_inputs(make_batch(config))
        count = reads[layers] = [0]
        with monkeypatch.context() as patch:
            for name in ("tolist", "item"):
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _original=original, _count=count, **kwargs):
                    caller = sys._getframe(1).f_code.co_filename
                    _count[0] += not caller.endswith("tensor_parallel/random.py")
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            with torch.no_grad():
                model.eval()(**inputs)
    assert reads[2] == reads[4], reads


def test_varlen_kernel_only_where_it_runs():
    """torch's varlen kernel: CUDA only; on the CPU the per-sequence SDPA path, whatever the dtype."""
    from megatron_vlm.backbones.attention import use_varlen_kernel

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert not use_varlen_kernel(torch.zeros(4, 2, 8, dtype=dtype), 0.0, None)


@pytest.mark.gpu
def test_varlen_kernel_on_a_gpu_for_16_bit_without_dropout():
    """On a GPU (pytest -m gpu, bench/gpu_check.sh): 16-bit without dropout takes the kernel, fp32
    or dropout the SDPA path; a torch without the kernel is named rather than passed over."""
    from megatron_vlm.backbones.attention import _varlen_attention, use_varlen_kernel

    assert _varlen_attention() is not None, f"torch {torch.__version__} has no torch.nn.attention.varlen"
    gpu = torch.zeros(4, 2, 8, dtype=torch.bfloat16, device="cuda")
    assert use_varlen_kernel(gpu, 0.0, None) and use_varlen_kernel(gpu.half(), 0.0, None)
    assert not use_varlen_kernel(gpu.float(), 0.0, None)
    assert not use_varlen_kernel(gpu, 0.1, None)


# --- straggler timing (training/stragglers.py): the device's work, not the kernel launches ---------


def test_a_timed_step_measures_the_devices_work_under_cudas_asynchronous_launches(monkeypatch):
    """On a GPU a phase's host time is its kernel launches unless the device is synchronized: the
    timed step's clock waits for the work launched in the phase (and, at its start, for the work of
    the phases before, which it must not count); untimed steps never synchronize."""
    from emulated_kernels import CudaQueue

    from megatron_vlm.training.stragglers import clock

    queue = CudaQueue()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", queue.synchronize)

    def phase(timed: bool, before: float, work: float) -> float:
        queue.launch(before)  # an earlier phase's work, still running
        start = clock(timed)
        queue.launch(work)
        return clock(timed) - start

    assert phase(False, 0.0, 0.3) < 0.1 and queue.synchronized == 0  # launches only: no waiting on untimed steps
    queue.synchronize()
    assert 0.3 <= phase(True, 0.3, 0.3) < 0.5  # this phase's 0.3 s, not the 0.3 s before it


@pytest.mark.gpu
def test_a_timed_step_waits_for_the_gpu():
    """On a GPU (pytest -m gpu): the timed clock includes the queued matmuls, the untimed one returns
    after their launches."""
    from megatron_vlm.training.stragglers import clock

    a = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    start = clock(False)
    for _ in range(20):
        a @ a
    launched = clock(False) - start
    finished = clock(True) - start
    assert finished > 2 * launched, (launched, finished)


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


@pytest.mark.parametrize(
    "preset", ["idefics2_8b_stage1.yaml", "idefics2_8b_stage2.yaml", "idefics2_8b_sft.yaml", "idefics2_8b_chatty.yaml"]
)
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
    monkeypatch.setattr(backend, "fp8_backend", lambda requested: "torch")
    run = load_run_config(
        EXAMPLES_DIR / "tiny_cpu.yaml",
        ["parallel.sequence_parallel=true", "parallel.tensor_parallel=2", "precision.fp8=hybrid"],
    )
    with pytest.raises(ValueError, match="FP8 through torch .* does not support sequence parallelism"):
        check_run(run, world_size=2)


def test_decoder_tokens_are_padded_for_te_fp8_and_sequence_parallelism(tiny, monkeypatch):
    """A 100-token source under TE FP8 and TP4 sequence parallelism: TE's FP8 GEMMs need aligned rows
    and sequence parallelism an even split, so the packed decoder sequence is padded to a multiple of
    4 x 16 by a filler sequence of its own; the start-up checks accept any sequence length."""
    from megatron_vlm.config import EXAMPLES_DIR, load_run_config
    from megatron_vlm.training.preflight import startup_problems

    config, hf = tiny
    monkeypatch.setattr(backend, "fp8_backend", lambda requested: "te")
    text = recipes_of(load_model_preset("idefics2-8b"))[2]
    fp8 = PrecisionConfig(params_dtype="bfloat16", fp8="hybrid")
    for sequence_parallel, multiple in ((True, 64), (False, 16)):
        parallel = ParallelConfig(tensor_parallel=4, sequence_parallel=sequence_parallel)
        language = text.transformer_config(load_model_preset("idefics2-8b"), parallel, fp8, False)
        assert decoder_token_multiple(language) == multiple
    monkeypatch.undo()
    model = _model(config, hf)
    model.token_multiple = 64
    batch = make_batch(config, seq_len=100)
    layout = model.layout(megatron_inputs(batch)["document_ids"])
    assert layout.real_tokens == int(batch.padding.sum()) and layout.total % 64 == 0
    assert layout.params.bounds[-2] == layout.real_tokens  # the filler is a sequence of its own
    with torch.no_grad():
        padded = gather_logits(model(**megatron_inputs(batch)), config.text.vocab_size)
        model.token_multiple = 1
        plain = gather_logits(model(**megatron_inputs(batch)), config.text.vocab_size)
    assert (padded - plain)[batch.padding.bool()].abs().max() <= 1e-5
    _machine_with_te(monkeypatch)
    run = load_run_config(
        EXAMPLES_DIR / "tiny_cpu.yaml",
        [
            "precision.fp8=hybrid",
            "data.micro_batch_size=1",
            "parallel.tensor_parallel=2",
            "parallel.sequence_parallel=true",
        ],
    )
    assert startup_problems(run, world_size=2)[1] == []


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
