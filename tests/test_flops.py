"""The analytic FLOP count (MFU's numerator) against torch's FLOP counter on the real model."""

import dataclasses

import pytest
from parity import make_batch, megatron_inputs, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_vlm.config import ParallelConfig, PrecisionConfig, load_model_preset
from megatron_vlm.models.idefics2 import build_model_chunks
from megatron_vlm.perf.flops import decoder_forward_flops, vision_forward_flops


def scaled(factor):
    config = dataclasses.replace(tiny_config(), make_vocab_size_divisible_by=1)  # logits over the real vocabulary
    v, t = config.vision, config.text
    return dataclasses.replace(
        config,
        vision=dataclasses.replace(
            v, hidden_size=v.hidden_size * factor, intermediate_size=v.intermediate_size * factor
        ),
        text=dataclasses.replace(t, hidden_size=t.hidden_size * factor, intermediate_size=t.intermediate_size * factor),
    )


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_forward_flops_match_torch_counter(megatron_single_process, factor):
    config = scaled(factor)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    side = 70  # equal image sizes: no padded patches, so computed and real patches agree
    batch = make_batch(config, images_per_row=[[(side, side)], [], [(side, side), (side, side)]], seq_len=40)
    # The math kernel: torch's counter has no formula for the CPU flash kernel's op.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # grad mode on: the tracker needs it
        model.eval()(**megatron_inputs(batch))
    measured = counter.get_total_flops()
    patches = (side // config.vision.patch_size) ** 2
    lengths = batch.padding.sum(dim=1).tolist()  # one document per row; padding is not computed
    # The counter counts a causal kernel's whole score matrix: every (query, key) pair of a document.
    analytic = 3 * vision_forward_flops(config, patches) + decoder_forward_flops(
        config, sum(lengths), sum(n * n for n in lengths)
    )
    assert analytic == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("window", [None, 8])
def test_training_step_count_matches_torch_counter_on_forward_and_backward(megatron_single_process, window):
    """What the trainer reports (``batch_training_flops``: MFU's numerator) against torch's counter
    over a real forward and backward of the same micro-batch, with and without a sliding window
    that binds (documents of up to 40 tokens, window 8). The counter sees what the kernels compute:
    each document's whole score matrix; the count is the causal (windowed) pairs, so the difference,
    counted here by enumerating every query's keys, is added back."""
    from megatron_vlm.data.batch import training_inputs
    from megatron_vlm.perf.flops import batch_training_flops

    base = scaled(1)
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, sliding_window=window))
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    side = 70
    batch = make_batch(config, images_per_row=[[(side, side)], [], [(side, side), (side, side)]], seq_len=40)
    micro = training_inputs(batch)
    inputs = {k: v for k, v in micro.items() if k != "loss_mask"}
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        (model.train()(**inputs) * micro["loss_mask"]).sum().backward()
    lengths = batch.padding.sum(dim=1).tolist()  # one document per row
    assert max(lengths) > 3 * (window or 0)
    pairs = sum(min(query + 1, window or query + 1) for n in lengths for query in range(n))
    squares = sum(n * n for n in lengths)
    tokens = sum(lengths)
    masked_out = decoder_forward_flops(config, tokens, squares) - decoder_forward_flops(config, tokens, pairs)
    # The pixels need no gradient, so the patch embedding's input gradient (one forward's worth of
    # its convolution, which 3x counts) is not computed.
    v = config.vision
    skipped = 3 * (side // v.patch_size) ** 2 * 2 * v.num_channels * v.patch_size**2 * v.hidden_size
    reported = batch_training_flops(config, micro)
    # Exact up to float rounding (measured: equal): the causal pairs are 1% of this step, what the
    # window removes 2%, so a looser bound would not see them.
    assert reported + 3 * masked_out - skipped == pytest.approx(counter.get_total_flops(), rel=1e-4)


def test_8b_decoder_count_follows_its_parameters():
    """At 8B the formula's decoder term is ~2 FLOPs per weight and token, plus attention."""
    config = load_model_preset("idefics2-8b")
    t = config.text
    per_layer_weights = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * t.intermediate_size
    weights = t.num_layers * per_layer_weights + 4096 * t.vocab_size
    tokens = 2048
    without_attention = decoder_forward_flops(config, tokens, 0)
    assert without_attention == pytest.approx(2 * weights * tokens, rel=1e-9)
    causal = tokens * (tokens + 1) // 2
    assert decoder_forward_flops(config, tokens, causal) - without_attention == 4 * causal * 4096 * t.num_layers
    # One 980 x 980 image (70 x 70 patches) costs about as much as ~1,300 text tokens.
    image = vision_forward_flops(config, 70 * 70)
    assert 2e12 < image < 1e13


def test_cross_attention_blocks_match_torch_counter(megatron_single_process):
    """Idefics1's gated cross-attention blocks: the tiny model's forward against torch's counter,
    the analytic count given what the kernels compute (every row's context padded to the batch's
    most images, every token scored against all of it)."""
    from parity import family_batch, family_config

    from megatron_vlm.backbones import recipes_of
    from megatron_vlm.models.cross_attention import gated_block_forward_flops, gated_blocks_in

    config = dataclasses.replace(family_config("idefics1"), make_vocab_size_divisible_by=1)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    batch = family_batch(config)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model.eval()(**megatron_inputs(batch))
    rows = batch.input_ids.shape[0]
    lengths = batch.padding.sum(dim=1).tolist()  # one document per row; padding is not computed
    tokens = sum(lengths)
    images = sum(len(row) for row in batch.images_per_row)
    side = config.vision.image_size // config.vision.patch_size
    context = max(len(row) for row in batch.images_per_row) * recipes_of(config)[1].tokens_per_image(config)
    # The blocks score every packed token against every row's context (masked to its own image).
    analytic = (
        images * vision_forward_flops(config, side * side)
        + decoder_forward_flops(config, tokens, sum(n * n for n in lengths))
        + gated_blocks_in(config, 0, config.text.num_layers)
        * gated_block_forward_flops(config, tokens, rows * context, tokens * rows * context)
    )
    assert analytic == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_vision_computes_no_padding_on_mixed_image_sizes(megatron_single_process):
    """A stage-2-like micro-batch (landscape, portrait and small images together, which the layout
    before packing padded to the largest height and width): the encoder's transformer layers and the
    connector compute the real patches only (measured), the trainer's count of computed positions
    is the real patches (real_patch_fraction 1); only the patch embedding (one convolution, ~0.2% of
    the 8B encoder per patch) runs over the padded grid."""
    from parity import IMAGE_SIZES

    from megatron_vlm.perf.flops import real_patches, vision_positions

    config = dataclasses.replace(tiny_config(), make_vocab_size_divisible_by=1)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    sizes = [(224, 112), (98, 224), *IMAGE_SIZES]
    batch = megatron_inputs(make_batch(config, images_per_row=[sizes[:3], sizes[3:]], seq_len=80))
    # The math kernel's matmuls are what torch's counter sees (it has no formula for CPU flash).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.eval().encode_images(batch["pixel_values"], batch["pixel_attention_mask"])
    patches = real_patches(config, batch)
    v, patch = config.vision, config.vision.patch_size
    padded = len(sizes) * (max(h for h, _ in sizes) // patch) * (max(w for _, w in sizes) // patch)
    assert sum(patches) < 0.6 * padded  # the old layout would have computed this much padding
    per_patch_embedding = 2 * v.num_channels * patch**2 * v.hidden_size
    analytic = sum(vision_forward_flops(config, n) for n in patches) + per_patch_embedding * (padded - sum(patches))
    assert counter.get_total_flops() == pytest.approx(analytic, rel=0.02)
    assert vision_positions(config, patches) == sum(patches)
    # The loader's batches carry their images' sizes on the host (issue #27): the count reads no
    # pixel mask, which DALI makes on the GPU (a read there waits for every queued kernel).
    import torch

    from megatron_vlm.data.packing import PackedSequence, PackingConfig, collate

    images = [torch.zeros(3, h, w) for h, w in sizes]
    packed = collate(
        [PackedSequence([1, 2], [0, 0], images, [0])], PackingConfig(seq_len=4, image_token_id=3, image_seq_len=1)
    )
    packed["pixel_attention_mask"] = packed["pixel_attention_mask"].to("meta")  # unreadable, as a sync would be
    assert real_patches(config, packed) == patches


@pytest.mark.parametrize("window", [None, 6])
def test_generated_token_count_matches_torch_counter_on_cached_decoding(megatron_single_process, window):
    """What evaluation reports per generated token (``generated_token_flops``) against torch's
    counter on the cached decode steps of a real generation (the prefill's FLOPs taken out: two runs,
    1 and 1 + k new tokens), with and without a sliding window that binds."""
    import torch

    from megatron_vlm.inference.generate import GenerationConfig, generate
    from megatron_vlm.perf.flops import generated_token_flops

    base = scaled(1)
    config = dataclasses.replace(base, text=dataclasses.replace(base.text, sliding_window=window))
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    length, decode_steps = 20, 5
    prompt = {
        "input_ids": torch.randint(0, 200, (1, length), generator=torch.Generator().manual_seed(0)),
        "position_ids": torch.arange(length)[None],
        "document_ids": torch.zeros(1, length, dtype=torch.long),
        "pixel_values": None,
        "pixel_attention_mask": None,
    }
    measured = []
    for new_tokens in (1, 1 + decode_steps):
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            generate([model], prompt, GenerationConfig(max_new_tokens=new_tokens))
        measured.append(counter.get_total_flops())
    positions = range(length, length + decode_steps)  # one forward per token after the prefill's
    analytic = sum(generated_token_flops(config, position) for position in positions)
    # The kernel scores the whole cache and masks what the window leaves out; the count is the
    # attended keys: the difference is added back, counted by hand.
    masked = sum(
        decoder_forward_flops(config, 1, position + 1)
        - decoder_forward_flops(config, 1, min(position + 1, window or 10**9))
        for position in positions
    )
    assert (masked > 0) == (window is not None)
    assert analytic + masked == pytest.approx(measured[1] - measured[0], rel=1e-4)
