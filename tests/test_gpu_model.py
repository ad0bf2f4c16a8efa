"""The model's GPU-only branches on a real GPU: Transformer Engine layers and attention, Megatron's
fused softmax kernels, LoRA on TE linears, FP8 through TE (``pytest -m gpu``).

Each test skips, with the reason, when what it exercises is not installed (the GPU machines we
measure on have no TE or apex); ``tests/test_gpu_paths.py`` checks the same decisions on CPU
against the libraries' rules.
"""

import pytest
import torch
from parity import forward_inputs, hf_logits, hf_model, make_batch, megatron_inputs, tiny_config, training_inputs
from test_fp8 import sharpened_hf_model, twin_gradient_errors, twin_logits_error
from test_gpu_paths import _model

from megatron_vlm import backend
from megatron_vlm.backbones import common
from megatron_vlm.config import PrecisionConfig, TrainableConfig
from megatron_vlm.models.idefics2 import gather_logits
from megatron_vlm.models.lora import apply_trainable, merge_lora

pytestmark = pytest.mark.gpu

needs_te = pytest.mark.skipif(
    not backend.imports("transformer_engine.pytorch"), reason="Transformer Engine is not installed here"
)


def _on_gpu(inputs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.fixture(scope="module")
def tiny(megatron_single_process):
    config = tiny_config()
    return config, hf_model(config)


@needs_te
def test_te_vision_attention_matches_hf_on_mixed_aspect_ratios(tiny):
    """TE's preferred (cuDNN fused / flash) attention on packed per-image sequences, bf16,
    against transformers in fp32."""
    config, hf = tiny
    model = _model(config, hf, PrecisionConfig(params_dtype="bfloat16", use_transformer_engine=True))
    assert type(model.vision.encoder.layers[0].self_attention.core_attention).__name__ == "TEDotProductAttention"
    batch = make_batch(config)
    with torch.no_grad():
        ours = model.encode_images(batch.pixel_values.cuda(), batch.pixel_mask.cuda()).float().cpu()
        reference = hf.model.get_image_features(batch.pixel_values[None], batch.pixel_mask[None].long())
        logits = gather_logits(model(**_on_gpu(megatron_inputs(batch))), config.text.vocab_size).float().cpu()
    expected = reference.pooler_output[0].reshape(ours.shape)
    assert (ours - expected).abs().max() <= 3e-2 * expected.abs().max()  # bf16
    valid = batch.padding.bool()
    reference_logits = hf_logits(hf, batch)
    assert (logits - reference_logits)[valid].abs().max() <= 3e-2 * reference_logits[valid].abs().max()


@needs_te
def test_te_layer_spec_linears_are_the_table_start_up_checks_use():
    assert common.spec_linears(common.te_layer_spec()) == common.TE_LAYER_LINEARS


@needs_te
def test_lora_on_te_linears_merges_exactly_and_matches_the_local_spec(tiny):
    """Adapters on TE's fused norm+linears read the layer-norm output: the same outputs as LoRA on
    the local spec's separate norm + linear, and merging them into the weights changes nothing."""
    config, hf = tiny
    outputs = {}
    for use_te in (True, False):
        model = _model(config, hf, PrecisionConfig(use_transformer_engine=use_te))
        apply_trainable([model], TrainableConfig(lora_rank=4, lora_alpha=8.0), seed=3)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora.b"):  # B starts at zero: make the adapters do something
                    param.copy_(0.05 * torch.randn_like(param))
        batch = _on_gpu(megatron_inputs(make_batch(config)))
        with torch.no_grad():
            adapted = gather_logits(model(**batch), config.text.vocab_size)
            assert merge_lora([model]) > 0
            merged = gather_logits(model(**batch), config.text.vocab_size)
        assert (adapted - merged).abs().max() <= 1e-4 * adapted.abs().max()
        outputs[use_te] = adapted.cpu()
    # fp32 on both specs; TE's attention kernels differ from the local spec's in summation order only.
    assert (outputs[True] - outputs[False]).abs().max() <= 2e-3 * outputs[False].abs().max()


def test_decoder_documents_through_torchs_varlen_kernel(megatron_single_process):
    """The local spec's decoder on a GPU, bf16: packed documents through torch's varlen flash kernel
    (one call per layer, sliding window binding) give transformers' logits document by document."""
    from parity import document_errors, packed_documents

    from megatron_vlm.backbones import attention

    if attention._varlen_attention() is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    config = tiny_config(sliding_window=8)
    hf = hf_model(config)
    model = _model(config, hf, PrecisionConfig(params_dtype="bfloat16", use_transformer_engine=False))
    documents = make_batch(config)
    inputs, lengths = packed_documents(documents)
    calls = []
    varlen, accepts = attention._varlen_attention()

    def counted(*args, **kwargs):
        calls.append(kwargs.get("window_size"))
        return varlen(*args, **kwargs)

    attention._varlen_attention.cache_clear()
    original = attention._varlen_attention
    attention._varlen_attention = lambda: (counted, accepts)
    try:
        with torch.no_grad():
            ours = gather_logits(model(**_on_gpu(inputs)), config.text.vocab_size).float().cpu()
    finally:
        attention._varlen_attention = original
    reference = hf_logits(hf, documents)
    assert len(calls) == config.vision.num_layers + config.text.num_layers  # the vision encoder's too
    assert max(document_errors(ours, reference, lengths)) <= 3e-2 * float(reference.abs().max())


# tests/test_fp8.py's bounds on the FP8 model against its bf16 twin (0.15, 0.95, 0.25), widened
# for TE (its own casts, fused norm + cast, cuBLAS FP8 GEMMs; not measured here). The CPU twin
# measures, with torch's FP8 linears: logits error 0.049-0.060, lowest cosine 0.984-0.990,
# gradient error 0.089-0.109; broken linears (zeros, a reshaped weight, a dropped scale) 0.86+,
# 0.0 or less, 1.0+; casts without scaling (as TE's first, uncalibrated pass) a lowest cosine of 0;
# saturating casts 0.21-0.25, 0.79-0.88, 0.31-0.39. This test run on CPU with torch's FP8 linears
# in place of TE's: logits errors 0.052 and 0.060, lowest cosine 0.981, gradient error 0.102.
TE_TWIN_LOGITS_BOUND = 0.2
TE_TWIN_COSINE_BOUND = 0.93
TE_TWIN_GRADIENT_BOUND = 0.3


@pytest.mark.skipif(not backend.has_fp8(), reason="FP8 through Transformer Engine needs TE on a GPU of compute >= 8.9")
def test_te_fp8_step_with_odd_patch_counts(tiny):
    """Images whose packed patch counts are not multiples of 8 (and the one-patch blank image of a
    text-only batch) through TE's FP8 GEMMs: padded, so no shape assertion; the logits and the loss
    gradient of every FP8 linear's weight close to the bf16 twin's, on trained-looking weights
    (tests/test_fp8.py's twin test; the loss alone cannot tell, about ln(vocabulary) whatever the
    linears compute)."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear, TELinear

    config, _ = tiny
    hf = sharpened_hf_model(config)
    batches = [
        make_batch(config, seed=2, images_per_row=images)
        for images in ([[(56, 98)], [], [(98, 42), (60, 90)], [(84, 84)]], [[], [], [], []])
    ]
    results = {}
    for fp8 in (None, "hybrid"):
        model = _model(config, hf, PrecisionConfig(params_dtype="bfloat16", fp8=fp8, fp8_backend="te"))
        model.train()
        linears = [
            name
            for name, module in model.named_modules()
            if isinstance(module, TELinear | TELayerNormColumnParallelLinear) and module.config.fp8
        ]
        assert bool(linears) == bool(fp8)
        logits, grads = [], {}
        for batch in batches:
            micro = _on_gpu(training_inputs(batch))
            mask = micro["loss_mask"].bool()
            # Two passes: TE's delayed scaling casts with the amaxes of the pass before (a model's
            # first pass with its initial scales of 1), so the second is scaled for this batch.
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                batch_logits = gather_logits(model(**forward_inputs(micro)), config.text.vocab_size).float()[mask]
                loss = torch.nn.functional.cross_entropy(batch_logits, micro["labels"][mask])
                loss.backward()
                assert torch.isfinite(loss)
            logits.append(batch_logits.detach().cpu())
            for name, param in model.named_parameters():
                if param.grad is not None:  # summed over the batches: the text-only one leaves vision's at 0
                    grads[name] = grads.get(name, 0) + param.grad.float().cpu()
        assert grads and all(torch.isfinite(g).all() for g in grads.values())
        results[fp8] = logits, grads, [f"{name}.weight" for name in linears]
    (logits, grads, weights), (reference_logits, reference_grads, _) = results["hybrid"], results[None]
    assert set(weights) <= set(grads)
    for ours, reference in zip(logits, reference_logits, strict=True):
        assert twin_logits_error(ours, reference) < TE_TWIN_LOGITS_BOUND, twin_logits_error(ours, reference)
    cosine, gradient_error = twin_gradient_errors(grads, reference_grads, weights)
    assert cosine > TE_TWIN_COSINE_BOUND, cosine
    assert gradient_error < TE_TWIN_GRADIENT_BOUND, gradient_error


def test_decoder_syncs_do_not_grow_with_its_layers(megatron_single_process):
    """Issue #27 on a GPU, under torch's sync debug mode: the synchronising calls of a forward (the
    layout's one read of the document ids, the vision lengths) do not grow with the decoder's layers
    (RoPE per packed token; Megatron's THD RoPE read ``cu_seqlens`` back in every layer)."""
    import dataclasses
    import warnings

    syncs = {}
    for layers in (2, 4):
        base = tiny_config()
        config = dataclasses.replace(base, text=dataclasses.replace(base.text, num_layers=layers))
        model = _model(config, hf_model(config), PrecisionConfig(params_dtype="bfloat16", use_transformer_engine=False))
        inputs = _on_gpu(megatron_inputs(make_batch(config)))
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(**inputs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs[layers] = sum("synchroniz" in str(warning.message) for warning in caught)
    assert syncs[2] == syncs[4], syncs


def test_siglip_position_ids_on_the_gpu_are_the_cpus():
    """Issue #27: the bucket boundaries are made on the host; made with CUDA's float32 arange they
    shifted the position ids of some grids (9/18/27 patches of 27, 10/20/35/... of 70)."""
    from megatron_vlm.backbones.siglip import bucketized_position_ids

    for side in (27, 70):
        for rows in range(1, side + 1):
            for cols in {1, rows, side}:
                mask = torch.ones(1, rows, cols, dtype=torch.bool)
                expected = bucketized_position_ids(mask, side)
                assert torch.equal(bucketized_position_ids(mask.cuda(), side).cpu(), expected), (side, rows, cols)


def test_generation_with_the_kv_cache_on_the_gpu(megatron_single_process):
    """Greedy generation with the KV cache on a GPU (fp32, TF32 off) equals the cache-free loop over
    the model's full forward on the same GPU (the 24-token parity with transformers runs on CPU)."""
    import dataclasses

    from test_generation import cache_free_greedy, prompts_of

    from megatron_vlm.config import ParallelConfig, load_model_preset
    from megatron_vlm.conversion.verify import true_float32
    from megatron_vlm.inference.generate import GenerationConfig, generate
    from megatron_vlm.inference.prompts import prompt_encoder
    from megatron_vlm.models.idefics2 import build_model_chunks

    base = load_model_preset("tiny")
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, sliding_window=6))
    torch.manual_seed(0)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(use_transformer_engine=False))
    with torch.no_grad():
        model.language_model.output_layer.weight.mul_(8.0)
    model.eval()
    inputs = _on_gpu(prompts_of(prompt_encoder(config)))
    with true_float32():
        ours = generate([model], inputs, GenerationConfig(max_new_tokens=12))
        reference = cache_free_greedy(model, config, inputs, 12)
    assert [out.token_ids for out in ours] == reference
