"""Parts of the paper's design space, each against its transformers module (fp32, 1e-4): the CLIP ViT
vision recipe (CLIPVisionModel), the MLP connector without pooling (Idefics2MLP), the composed
CLIP + MLP + Mistral model (an oracle assembled from those transformers modules and
MistralForCausalLM; TP2 in ``workers/design_parts_worker.py``), a perceiver with a non-default
latent count (Idefics2ForConditionalGeneration), and square resizing (Pillow and DALI-CPU against
transformers' Idefics2ImageProcessor) with its start-up check."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path

import pytest
import torch
from parity import run_torchrun

from megatron_vlm import backbones
from megatron_vlm.backbones import mapping
from megatron_vlm.config import ModelConfig, ParallelConfig, PrecisionConfig, VisionConfig, load_model_preset

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]
# Where each part lives in our model and in transformers' Idefics2-style checkpoint.
PART_PREFIXES = {
    "vision": ("vision.", "model.vision_model."),
    "connector": ("connector.", "model.connector."),
    "text": ("language_model.", "model.text_model."),
}


# --------------------------------------------------------------------------------------------
# Shared with the TP2 worker: configs, the transformers oracle, loading through the recipes' rows
# --------------------------------------------------------------------------------------------


def small_vocabulary(config: ModelConfig) -> ModelConfig:
    """The preset with a small vocabulary (fast HF and Megatron), image tokens at its end."""
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, vocab_size=259),
        fake_image_token_id=256,
        image_token_id=257,
        end_of_utterance_token_id=258,
        make_vocab_size_divisible_by=16,
    )


def clip_mlp_config() -> ModelConfig:
    return small_vocabulary(load_model_preset("tiny_clip_mlp"))


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Norms, biases and the class token off their constant initial values, so every tensor's
    mapping shows in the output."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name or "class_embedding" in name or name.endswith(".bias"):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def hf_clip(vision: VisionConfig, seed: int = 0) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**backbones.recipe("vision", "clip").to_hf(vision))).float().eval()
    randomize(model, torch.Generator().manual_seed(seed))
    return model


def hf_projection(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    from transformers.models.idefics2.modeling_idefics2 import Idefics2MLP

    torch.manual_seed(seed + 1)
    t = config.text
    return Idefics2MLP(config.vision.hidden_size, t.intermediate_size, t.hidden_size, "silu").float().eval()


class HfOracle:
    """CLIP + MLP connector + Mistral from transformers' own modules: CLIPVisionModel's
    last_hidden_state, Idefics2MLP, spliced into MistralForCausalLM's input embeddings at the
    ``<image>`` positions (batch-major, as Idefics2's ``inputs_merger``)."""

    def __init__(self, config: ModelConfig, seed: int = 0) -> None:
        from transformers import MistralConfig, MistralForCausalLM

        self.config = config
        self.vision = hf_clip(config.vision, seed)
        self.projection = hf_projection(config, seed)
        torch.manual_seed(seed + 2)
        text = backbones.recipe("text", config.text.kind).to_hf(config.text, config.pad_token_id)
        self.text = MistralForCausalLM(MistralConfig(**text)).float().eval()
        randomize(self.text, torch.Generator().manual_seed(seed + 3))

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor under Idefics2's checkpoint names."""
        state = {f"model.vision_model.{k}": v for k, v in self.vision.state_dict().items()}
        state.update({f"model.connector.modality_projection.{k}": v for k, v in self.projection.state_dict().items()})
        for name, tensor in self.text.state_dict().items():
            state[
                "lm_head.weight" if name == "lm_head.weight" else "model.text_model." + name.removeprefix("model.")
            ] = tensor
        return state

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, padding: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values=pixel_values).last_hidden_state
        tokens = self.projection(features)
        embeddings = self.text.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        embeddings = embeddings.masked_scatter(is_image[..., None], tokens.reshape(-1, tokens.shape[-1]))
        return self.text(inputs_embeds=embeddings, attention_mask=padding).logits


def part_table(config: ModelConfig, parts: tuple[str, ...] = ("vision", "connector", "text")) -> list:
    """The recipes' rows of ``parts``, placed as in Idefics2's checkpoint and our model."""
    vision, connector, text = backbones.recipes_of(config)
    rows = {"vision": vision.rows(config.vision), "connector": connector.rows(config), "text": text.rows(config.text)}
    return [row.prefixed(*PART_PREFIXES[part]) for part in parts for row in rows[part]]


@torch.no_grad()
def load_through_rows(
    module: torch.nn.Module, table: list, state: dict, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1
) -> None:
    """Copy HF tensors into ``module`` through the rows (fusion and TP split as the converters do);
    every parameter must be filled and every HF tensor used."""
    params = dict(module.named_parameters())
    used = set()
    for name, row, layer in mapping.expand(table):
        names = row.hf_names(layer)
        full = mapping.hf_to_megatron(row, [state[n] for n in names], config)
        piece = mapping.shard(row, full, tp_rank, tp_size)
        param = params.pop(name)
        assert param.shape == piece.shape, (name, param.shape, piece.shape)
        param.copy_(piece)
        used.update(names)
    assert not params, f"parameters without a row: {sorted(params)}"
    assert used == set(state), f"HF tensors without a row: {sorted(set(state) - used)}"


def image_batch(config: ModelConfig, sizes_per_row: list[int], seq_len: int, seed: int = 0) -> tuple:
    """Rows with ``n`` images each (<fake><image> x tokens_per_image<fake> spans), the text-only row
    right-padded; whole square images at the vision image_size. -> (input_ids, padding, pixel_values)."""
    per_image = backbones.recipes_of(config)[1].tokens_per_image(config)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 250, (len(sizes_per_row), seq_len), generator=generator)
    padding = torch.ones_like(input_ids)
    for row, count in enumerate(sizes_per_row):
        position = 2
        for _ in range(count):
            span = [config.fake_image_token_id] + [config.image_token_id] * per_image + [config.fake_image_token_id]
            input_ids[row, position : position + len(span)] = torch.tensor(span)
            position += len(span) + 3
        assert position <= seq_len
        if count == 0:
            padding[row, -6:] = 0
            input_ids[row, -6:] = 0
    size = config.vision.image_size
    pixel_values = torch.randn(sum(sizes_per_row), config.vision.num_channels, size, size, generator=generator)
    return input_ids, padding, pixel_values


def megatron_forward(model: torch.nn.Module, input_ids, padding, pixel_values, image_token_id) -> torch.Tensor:
    from megatron_vlm.data.batch import forward_inputs, micro_batch, one_document_per_row
    from megatron_vlm.models.idefics2 import gather_logits

    mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.bool)
    batch = micro_batch(input_ids, one_document_per_row(padding), pixel_values, mask, image_token_id)
    with torch.no_grad():
        return gather_logits(model(**forward_inputs(batch)), model.vocab_size)


# --------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------


def clip_vision(**changes) -> VisionConfig:
    return dataclasses.replace(load_model_preset("tiny_clip_mlp").vision, **changes)


def clip_encoder(vision: VisionConfig, hf: torch.nn.Module) -> torch.nn.Module:
    recipe = backbones.recipe("vision", "clip")
    encoder = recipe.build(vision, ParallelConfig(), PrecisionConfig(), initialize=False, use_te=False).eval()
    load_through_rows(encoder, recipe.rows(vision), hf.state_dict(), ModelConfig(vision=vision))
    return encoder


def full_masks(pixel_values: torch.Tensor) -> torch.Tensor:
    return torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.bool)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_equals_transformers_last_hidden_state(megatron_single_process, hidden_act):
    vision = clip_vision(hidden_act=hidden_act)
    hf = hf_clip(vision)
    encoder = clip_encoder(vision, hf)
    pixels = torch.randn(3, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features, lengths = encoder(pixels, full_masks(pixels))
        reference = hf(pixel_values=pixels).last_hidden_state  # class token + 36 patches, not post-layernormed
    per_image = backbones.recipe("vision", "clip").tokens_per_image(vision)
    assert per_image == 37 and lengths.tolist() == [per_image] * 3
    ours = features.reshape(3, per_image, -1)
    assert (ours - reference).abs().max() <= TOLERANCE
    assert reference.abs().max() > 0.1
    # Images attend only within themselves: image 1 alone gives the same tokens.
    with torch.no_grad():
        alone, _ = encoder(pixels[1:2], full_masks(pixels[1:2]))
    assert (alone - ours[1]).abs().max() <= TOLERANCE


def test_clip_under_te_fp8_pads_its_rows_to_16_with_unchanged_output(megatron_single_process):
    """The FP8 branch (Transformer Engine's GEMMs want row counts that are multiples of 16): 3 images
    of 37 tokens are padded by a sequence of zeros to 112 rows; every encoder GEMM sees aligned rows
    and the images' tokens are those of the unpadded run (the padding attends only to itself)."""
    from megatron_vlm.backbones.common import FP8_TOKEN_MULTIPLE, te_fp8_gemm_problem

    vision = clip_vision(hidden_act="quick_gelu")
    encoder = clip_encoder(vision, hf_clip(vision))
    pixels = torch.randn(3, 3, vision.image_size, vision.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain, _ = encoder(pixels, full_masks(pixels))
        encoder.token_multiple = FP8_TOKEN_MULTIPLE
        rows = []
        hooks = [
            m.register_forward_hook(lambda _m, args, _o: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape))
            for m in encoder.encoder.modules()
            if type(m).__name__ in ("ColumnParallelLinear", "RowParallelLinear")
        ]
        padded, lengths = encoder(pixels, full_masks(pixels))
        for hook in hooks:
            hook.remove()
    assert plain.shape[0] == 3 * 37 and rows and {r for r, _ in rows} == {112}
    assert all(te_fp8_gemm_problem(r, c, 16) is None for r, c in rows)
    assert padded.shape == plain.shape and lengths.tolist() == [37] * 3
    assert (padded - plain).abs().max() <= 1e-5


def test_clip_refuses_images_not_at_its_square_naming_the_size(megatron_single_process):
    vision = clip_vision()
    encoder = backbones.recipe("vision", "clip").build(vision, ParallelConfig(), PrecisionConfig(), False, False)
    big = torch.zeros(2, 3, 98, 98)
    with pytest.raises(ValueError, match=r"exactly 84x84 pixels; the batch is 98x98.*image\.resize: square"):
        encoder(big, full_masks(big))
    padded = torch.zeros(2, 3, 84, 84)
    mask = full_masks(padded)
    mask[1, 70:, :] = False  # a 70x84 image padded to the batch's 84x84
    with pytest.raises(ValueError, match=r"images \[1\] are padded \(image 1 is 70x84 real pixels.*image\.resize"):
        encoder(padded, mask)


def test_clip_config_and_activation_are_checked_by_name():
    from transformers import CLIPConfig

    recipe = backbones.recipe("vision", "clip")
    vision = clip_vision()
    written = recipe.to_hf(vision)
    assert recipe.from_hf(recipe.hf_config(written)) == vision
    full = CLIPConfig(vision_config=written).to_dict()  # a CLIPModel's config.json: its vision part
    assert recipe.from_hf(recipe.hf_config(full)) == vision
    assert backbones.recipe_for_hf("vision", "clip_vision_model") is recipe
    with pytest.raises(ValueError, match=r"hidden_act='relu' is not implemented for CLIP"):
        recipe.from_hf(recipe.hf_config({**written, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"hidden_act='relu' is not implemented for CLIP"):
        recipe.transformer_config(clip_vision(hidden_act="relu"), ParallelConfig(), PrecisionConfig())
    siglip = backbones.recipe("vision", "siglip")
    with pytest.raises(ValueError, match=r"hidden_act='quick_gelu': the siglip recipe implements 'gelu_pytorch_tanh'"):
        siglip.transformer_config(VisionConfig(hidden_act="quick_gelu"), ParallelConfig(), PrecisionConfig())


def test_clip_standalone_checkpoint_at_another_resolution_equals_interpolated_transformers(megatron_single_process):
    """A CLIPModel checkpoint's vision tensors (text tower and heads left out) at 112 px instead of
    its 84: the position table resized as transformers' interpolate_pos_encoding resizes it."""
    from transformers import CLIPConfig, CLIPModel

    recipe = backbones.recipe("vision", "clip")
    native = clip_vision()
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(vision_config=recipe.to_hf(native), text_config=text)).float().eval()
    randomize(clip, torch.Generator().manual_seed(0))
    source = clip.state_dict()
    used, ignored = recipe.standalone_names(set(source))
    assert set(used) == set(clip.vision_model.state_dict())
    assert {"logit_scale", "visual_projection.weight", "text_projection.weight"} <= set(ignored)
    assert all(
        name.startswith(("text_model.", "logit_scale", "visual_projection", "text_projection")) for name in ignored
    )
    larger = dataclasses.replace(native, image_size=112)
    state = {relative: recipe.adapt_standalone(relative, source[name], larger) for relative, name in used.items()}
    assert state["embeddings.position_embedding.weight"].shape == (1 + 8 * 8, native.hidden_size)
    encoder = backbones.recipe("vision", "clip").build(larger, ParallelConfig(), PrecisionConfig(), False, False).eval()
    load_through_rows(encoder, recipe.rows(larger), state, ModelConfig(vision=larger))
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, _ = encoder(pixels, full_masks(pixels))
        reference = clip.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    assert (ours.reshape(2, 65, -1) - reference).abs().max() <= TOLERANCE
    assert reference.abs().max() > 0.1  # an absolute tolerance means something only against values this large


def test_clip_and_mlp_counts_equal_the_modules(megatron_single_process):
    config = clip_mlp_config()
    vision, connector, _ = backbones.recipes_of(config)
    encoder = vision.build(config.vision, ParallelConfig(), PrecisionConfig(), False, False)
    assert sum(p.numel() for p in encoder.parameters()) == vision.parameters(config.vision).per_rank(1)
    module = connector.build(config, ParallelConfig(), PrecisionConfig(), False)
    assert sum(p.numel() for p in module.parameters()) == connector.parameters(config).per_rank(1)


# --------------------------------------------------------------------------------------------
# MLP connector
# --------------------------------------------------------------------------------------------


def test_mlp_connector_equals_idefics2_modality_projection(megatron_single_process):
    config = clip_mlp_config()
    recipe = backbones.recipe("connector", "mlp")
    hf = hf_projection(config)
    connector = recipe.build(config, ParallelConfig(), PrecisionConfig(), initialize=False).eval()
    state = {f"modality_projection.{k}": v for k, v in hf.state_dict().items()}
    load_through_rows(connector, recipe.rows(config), state, config)
    per_image = recipe.tokens_per_image(config)
    features = torch.randn(3, per_image, config.vision.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = connector(features.reshape(-1, config.vision.hidden_size), torch.tensor([per_image] * 3))
        reference = hf(features)  # [images, tokens, text hidden]
    assert ours.shape == (per_image, 3, config.text.hidden_size)  # [tokens, images, hidden], as the resampler's
    assert (ours.transpose(0, 1) - reference).abs().max() <= TOLERANCE
    assert reference.abs().max() > 0.1
    with pytest.raises(ValueError, match=r"this batch has \[16, 37\] vision tokens per image.*image\.resize: square"):
        connector(features.reshape(-1, config.vision.hidden_size)[:53], torch.tensor([37, 16]))


def test_tokens_per_image_of_each_recipe():
    clip_mlp = clip_mlp_config()
    assert backbones.recipe("vision", "clip").tokens_per_image(clip_mlp.vision) == 1 + 6 * 6
    siglip_mlp = dataclasses.replace(load_model_preset("tiny"), connector=dataclasses.replace(clip_mlp.connector))
    assert backbones.recipe("connector", "mlp").tokens_per_image(siglip_mlp) == (224 // 14) ** 2
    perceiver = load_model_preset("tiny")
    perceiver = dataclasses.replace(perceiver, connector=dataclasses.replace(perceiver.connector, num_latents=12))
    assert backbones.recipe("connector", "perceiver").tokens_per_image(perceiver) == 12
    with pytest.raises(ValueError, match=r"no transformers config describes the mlp connector"):
        backbones.recipe("connector", "mlp").from_hf(None)


# --------------------------------------------------------------------------------------------
# Composed models
# --------------------------------------------------------------------------------------------


def test_clip_mlp_mistral_logits_equal_the_transformers_composition(megatron_single_process):
    """CLIP -> MLP connector -> Mistral, every vision token an image token (37 per image), against
    CLIPVisionModel + Idefics2MLP + MistralForCausalLM; a text-only padded row among image rows."""
    from megatron_vlm.models.idefics2 import build_model_chunks

    config = clip_mlp_config()
    oracle = HfOracle(config)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(), initialize_weights=False)
    load_through_rows(model.eval(), part_table(config), oracle.state(), config)
    input_ids, padding, pixel_values = image_batch(config, [1, 0, 2], seq_len=96)
    ours = megatron_forward(model, input_ids, padding, pixel_values, config.image_token_id)
    reference = oracle.logits(input_ids, padding, pixel_values)
    valid = padding.bool()
    assert ours.shape == reference.shape == (3, 96, config.text.vocab_size)
    assert (ours - reference)[valid].abs().max() <= TOLERANCE
    assert reference[valid].abs().max() > 0.1


def test_siglip_with_mlp_connector_splices_every_patch_of_square_images(megatron_single_process):
    """SigLIP under the mlp connector: square images at its image_size give grid^2 tokens each; an
    image's pixels change the logits from its own first token on, and nothing before it."""
    from megatron_vlm.models.idefics2 import build_model_chunks

    tiny = load_model_preset("tiny")
    config = small_vocabulary(
        dataclasses.replace(
            tiny,
            vision=dataclasses.replace(tiny.vision, image_size=56),
            connector=dataclasses.replace(tiny.connector, kind="mlp"),
        )
    )
    torch.manual_seed(0)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    model.eval()
    input_ids, padding, pixel_values = image_batch(config, [1, 0, 2], seq_len=48, seed=4)
    assert int((input_ids == config.image_token_id).sum()) == 3 * 16
    before = megatron_forward(model, input_ids, padding, pixel_values, config.image_token_id)
    assert before.shape == (3, 48, config.text.vocab_size)
    changed = pixel_values.clone()
    changed[2] += 1.0  # the second image of row 2
    after = megatron_forward(model, input_ids, padding, changed, config.image_token_id)
    first = int((input_ids[2] == config.image_token_id).nonzero()[16])  # its first <image> token
    difference = (after - before).abs().amax(dim=-1)
    assert difference[:2].max() == 0 and difference[2, :first].max() == 0
    assert difference[2, first:].min() > 0


def test_perceiver_with_12_latents_equals_transformers(megatron_single_process):
    """A non-default latent count (the paper compares 64 and 128) against Idefics2 with
    perceiver_config.resampler_n_latents=12."""
    from parity import hf_logits, hf_model, make_batch, megatron_inputs, tiny_config

    from megatron_vlm.conversion.mapping import load_hf_weights
    from megatron_vlm.models.idefics2 import build_model_chunks, gather_logits

    base = tiny_config()
    config = dataclasses.replace(base, connector=dataclasses.replace(base.connector, num_latents=12))
    hf = hf_model(config)
    assert hf.config.perceiver_config.resampler_n_latents == 12
    state = hf.state_dict()
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig(), initialize_weights=False)
    load_hf_weights([model], state.__getitem__, set(state), config, 0, 1)
    batch = make_batch(config, seq_len=64)
    assert int((batch.input_ids == config.image_token_id).sum()) == 4 * 12
    with torch.no_grad():
        ours = gather_logits(model.eval()(**megatron_inputs(batch)), model.vocab_size)
    reference = hf_logits(hf, batch)
    valid = batch.padding.bool()
    assert (ours - reference)[valid].abs().max() <= TOLERANCE
    assert reference[valid].abs().max() > 0.1


@pytest.mark.first_env_only
def test_clip_mlp_mistral_at_tp2_equals_the_transformers_composition(tmp_path):
    """The composed CLIP + MLP + Mistral at tensor parallelism 2 (heads, fused QKV, the projection's
    gate/up split over two real processes) against the same transformers composition."""
    run_torchrun("design_parts_worker.py", 2, ["--out", str(tmp_path)], timeout=300)
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


# --------------------------------------------------------------------------------------------
# Square resize and its start-up check
# --------------------------------------------------------------------------------------------

PHOTOS = ("chelsea", "coffee", "rocket_portrait", "hubble")


def encoded_photos() -> list[bytes]:
    return [(ROOT / "examples" / "data" / "images" / f"{name}.jpg").read_bytes() for name in PHOTOS]


def square_reference(size: int, split: bool) -> dict:
    """transformers' Idefics2ImageProcessor resizing to a fixed height x width."""
    from PIL import Image
    from transformers import Idefics2ImageProcessor

    processor = Idefics2ImageProcessor(size={"height": size, "width": size}, do_image_splitting=split)
    return processor([[Image.open(BytesIO(data)) for data in encoded_photos()]], return_tensors="pt")


@pytest.mark.first_env_only
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
def test_square_resize_pillow_equals_transformers_and_dali_cpu_is_within_the_bound(split):
    from test_dali import MAX_ABS_BOUND, MEAN_ABS_BOUND

    from megatron_vlm.data.dali import DaliImageProcessor, PillowImageProcessor
    from megatron_vlm.data.images import ImageConfig, pad_images

    config = ImageConfig(longest_edge=84, shortest_edge=84, split=split, resize="square")
    reference = square_reference(84, split)
    ref_pixels = reference["pixel_values"][0]
    images = len(PHOTOS) * (5 if split else 1)
    assert ref_pixels.shape == (images, 3, 84, 84) and reference["pixel_attention_mask"].bool().all()
    pillow = [crop for crops in PillowImageProcessor(config)(encoded_photos()) for crop in crops]
    assert all(tuple(crop.shape) == (3, 84, 84) for crop in pillow)
    assert torch.equal(torch.stack(pillow), ref_pixels)
    dali = [crop for crops in DaliImageProcessor(config, device="cpu")(encoded_photos()) for crop in crops]
    pixel_values, mask = pad_images(dali)
    assert pixel_values.shape == ref_pixels.shape and mask.all()
    difference = (pixel_values - ref_pixels).abs()
    assert difference.max() <= MAX_ABS_BOUND
    assert difference.flatten(1).mean(1).max() <= MEAN_ABS_BOUND
    # The default keeps the aspect ratio: the same photos come out in other shapes.
    kept = PillowImageProcessor(ImageConfig(longest_edge=84, shortest_edge=42))(encoded_photos())
    assert {tuple(crops[0].shape) for crops in kept} != {(3, 84, 84)}


def test_unknown_resize_mode_is_refused_by_name(tmp_path):
    from megatron_vlm.data.images import ImageConfig
    from megatron_vlm.data.loader import load_data_config

    with pytest.raises(ValueError, match=r"image\.resize='crop' is not one of \('longest_edge', 'square'\)"):
        ImageConfig(resize="crop")
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text("image: {resize: squash}\nsources: []\n")
    with pytest.raises(ValueError, match=r"image\.resize='squash'"):
        load_data_config(mixture, tmp_path)


def test_preflight_refuses_a_fixed_resolution_model_on_unsquare_data(tmp_path):
    from megatron_vlm.config import load_run_config
    from megatron_vlm.training.preflight import image_size_problem, startup_problems

    def problems(model: str, mixture: str) -> list[str]:
        run = load_run_config(ROOT / "examples" / "tiny_cpu.yaml", [f"model={model}", f"data.mixture={mixture}"])
        return [p for p in startup_problems(run, 1)[1] if "image.resize" in p]

    assert problems("tiny_clip_mlp", "tiny_square") == []
    (refused,) = problems("tiny_clip_mlp", "tiny")
    assert refused == (
        "vision kind 'clip' takes images at exactly its image_size: the data mixture 'tiny' must set "
        "image.resize: square and image.longest_edge: 84 (it has resize='longest_edge', longest_edge=112)"
    )
    assert problems("tiny", "tiny") == []  # SigLIP + perceiver: any size, any aspect ratio
    from megatron_vlm.data.images import ImageConfig

    tiny = load_model_preset("tiny")
    siglip_mlp = dataclasses.replace(tiny, connector=dataclasses.replace(tiny.connector, kind="mlp"))
    assert "connector kind 'mlp' needs the same number of vision tokens" in image_size_problem(
        siglip_mlp, ImageConfig(longest_edge=224, resize="longest_edge"), "m"
    )
    assert "image.longest_edge: 224 (it has resize='square', longest_edge=84)" in image_size_problem(
        siglip_mlp, ImageConfig(longest_edge=84, resize="square"), "m"
    )
    assert image_size_problem(siglip_mlp, ImageConfig(longest_edge=224, resize="square"), "m") is None


def test_pixel_normalization_follows_the_vision_encoder(tmp_path):
    """A mixture that sets no mean/std takes the encoder's (CLIP's own, SigLIP's 0.5), as the
    transformers processors of each do; a mixture that sets them keeps its own."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from megatron_vlm.backbones import recipe
    from megatron_vlm.data.loader import load_data_config

    for kind, processor in (("clip", CLIPImageProcessor()), ("siglip", SiglipImageProcessor())):
        vision = recipe("vision", kind)
        config = load_data_config("tiny_square", tmp_path, normalization=(vision.image_mean, vision.image_std))
        assert config.image.mean == pytest.approx(processor.image_mean) and config.image.std == pytest.approx(
            processor.image_std
        )
    mixture = tmp_path / "own.yaml"
    mixture.write_text(
        "image: {resize: square, longest_edge: 84, mean: [0.1, 0.2, 0.3], std: [1, 1, 1]}\n"
        "sources: [{name: pairs, shards: pairs, weight: 1.0, seq_len: 64}]\n"
    )
    clip = recipe("vision", "clip")
    own = load_data_config(mixture, tmp_path, normalization=(clip.image_mean, clip.image_std))
    assert tuple(own.image.mean) == (0.1, 0.2, 0.3)


def test_preflight_checks_the_cross_attention_model_against_its_data():
    """Every preset trains on the mixture its comment names without a start-up problem; a mixture
    packing more images per sequence than the cross-attention context holds, or sequence
    parallelism with cross-attention, is refused by name before anything is built."""
    from megatron_vlm.config import load_run_config
    from megatron_vlm.training.preflight import startup_problems

    def problems(*overrides: str) -> list[str]:
        return startup_problems(load_run_config(ROOT / "examples" / "tiny_cpu.yaml", list(overrides)), 2)[1]

    for model in ("tiny_idefics1", "tiny_idefics3", "tiny_clip", "tiny_clip_mlp", "tiny_mlp"):
        assert problems(f"model={model}", "data.mixture=tiny_square") == [], model
    assert problems("model=tiny_llama", "data.mixture=tiny") == []
    (refused,) = problems(
        "model=tiny_idefics1", "data.mixture=tiny_square", "model.cross_attention.max_images_per_row=4"
    )
    assert refused == (
        "the data mixture 'tiny_square' packs up to max_images_per_sequence=6 images per sequence, above "
        "model.cross_attention.max_images_per_row=4 (the image context of a row has that many slots)"
    )
    refused = problems(
        "model=tiny_idefics1",
        "data.mixture=tiny_square",
        "parallel.tensor_parallel=2",
        "parallel.sequence_parallel=true",
    )
    assert any(
        "parallel.sequence_parallel is not implemented for model.architecture=cross_attention" in p for p in refused
    )


@pytest.mark.parametrize("preset", ["tiny_clip_mlp", "tiny_idefics3", "tiny_idefics1"])
def test_frozen_and_lora_regimes_on_every_architecture(megatron_single_process, preset):
    """The paper's training regimes on each new model: with the backbones frozen and LoRA on both,
    only adapters and the new parts (connector; Idefics1's gated blocks) train, every adapter sits on
    a vision or decoder linear and gets a gradient, and the frozen weights get none."""
    from megatron_vlm.backbones import text_tokens_per_image
    from megatron_vlm.config import TrainableConfig
    from megatron_vlm.data.batch import make_batch, training_inputs
    from megatron_vlm.models.idefics2 import build_model_chunks
    from megatron_vlm.models.lora import apply_trainable

    config = load_model_preset(preset)
    (model,) = build_model_chunks(config, ParallelConfig(), PrecisionConfig())
    trainable = TrainableConfig(freeze_vision=True, freeze_language=True, lora_rank=4, lora_alpha=8.0)
    apply_trainable([model], trainable)
    training = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in training if ".lora." in name}
    new_parts = training - adapters
    assert {n.split(".")[0] for n in adapters} == {"vision", "language_model"}
    assert new_parts and all(n.startswith("connector.") or ".gated_cross_attention." in n for n in new_parts), sorted(
        new_parts
    )
    assert any(".gated_cross_attention." in n for n in new_parts) == (config.architecture == "cross_attention")

    side = config.vision.image_size
    batch = make_batch(
        config, images_per_row=[[(side, side)], [(side, side)]], seq_len=96, image_seq_len=text_tokens_per_image(config)
    )
    inputs = training_inputs(batch)
    with torch.no_grad():  # Idefics1's tanh gates start closed: no gradient would reach the images
        for name, parameter in model.named_parameters():
            if ".alpha_" in name:
                parameter.fill_(0.5)
    loss = model(
        **{
            k: inputs[k]
            for k in ("input_ids", "position_ids", "document_ids", "pixel_values", "pixel_attention_mask", "labels")
        }
    )
    (loss * inputs["loss_mask"]).sum().backward()
    assert any(name.endswith(".lora.b") for name in adapters)
    for name, parameter in model.named_parameters():
        assert (parameter.grad is not None) == (name in training), name
        if name.endswith(".lora.b"):  # B starts at zero, so A's gradient is zero at first; B's is not
            assert parameter.grad.abs().max() > 0, name


def test_wandb_is_refused_by_name_where_it_is_not_installed(monkeypatch):
    """logging.wandb asked for on a machine without wandb: refused at start-up, naming it; not asked
    for, nothing needs it."""
    import sys

    from megatron_vlm.config import load_run_config
    from megatron_vlm.training.preflight import startup_problems

    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds where it is not installed
    asked = load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["logging.wandb.project=ablations"])
    (refused,) = startup_problems(asked, 1)[1]
    assert "logging.wandb.project='ablations'" in refused and "wandb is not installed" in refused
    assert startup_problems(load_run_config(ROOT / "examples" / "tiny_cpu.yaml"), 1)[1] == []
    with pytest.raises(ValueError, match="logging.wandb.mode='local' is not one of"):
        load_run_config(ROOT / "examples" / "tiny_cpu.yaml", ["logging.wandb.mode=local"])
