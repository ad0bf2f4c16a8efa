"""HF <-> Megatron conversion, both directions through the one mapping table.

* ``hf_to_megatron``: an HF directory of a supported family (Idefics2, Idefics3, Idefics1: read from its
  ``config.json``'s ``model_type``) -> a Megatron checkpoint directory (collective:
  every rank of the TP x PP layout reads only the tensors it holds, one at a time).
* ``separate_to_megatron``: the paper's starting point, SigLIP + Mistral HF directories; the
  connector keeps its fresh initialisation, the vocabulary gains the three image tokens (rows
  initialised to the mean of the existing rows), the position table is resized when its grid
  differs from the target image size.
* ``megatron_to_hf``: a Megatron checkpoint (any layout; LoRA adapters merged) -> a directory that
  the family's transformers class (``Idefics2ForConditionalGeneration`` ...) loads, written shard by shard.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_vlm.backbones import mapping as rows
from megatron_vlm.backbones import recipe_for_hf, recipes_of
from megatron_vlm.config import ConnectorConfig, ModelConfig, ParallelConfig, PrecisionConfig
from megatron_vlm.conversion import mapping
from megatron_vlm.conversion.families import family_of
from megatron_vlm.conversion.hf_config import (
    from_hf_config,
    refuse_unmodelled,
    to_hf_config_dict,
    unmodelled_fields,
)
from megatron_vlm.conversion.hf_io import HFCheckpoint, ShardedSafetensorsWriter, write_json
from megatron_vlm.distributed import collective_device
from megatron_vlm.models.checkpoint_io import (
    load_model,
    model_config_of,
    read_metadata,
    save_model,
    trainable_config_of,
)
from megatron_vlm.models.idefics2 import build_model_chunks
from megatron_vlm.models.lora import apply_trainable, merge_lora
from megatron_vlm.models.naming import global_parameter_names
from megatron_vlm.perf.memory import peak_rss_bytes

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}


@dataclass
class ConversionReport:
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    ignored: list[str] = field(default_factory=list)
    dtype: str = ""  # what the weights were written in
    dtype_reason: str = ""  # why that dtype (given, or the source's)

    def summary(self) -> str:
        ignored = (
            f"; ignored {len(self.ignored)} source tensors ({', '.join(self.ignored[:4])}...)" if self.ignored else ""
        )
        dtype = f" in {self.dtype} ({self.dtype_reason})" if self.dtype else ""
        return (
            f"{self.tensors} tensors, {self.bytes / 2**20:.1f} MiB{dtype} in {self.seconds:.1f} s; "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB{ignored}"
        )


def _max_over_ranks(value: int) -> int:
    if not torch.distributed.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=collective_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor[0])


def rank0_progress(description: str) -> Callable[[Iterable], Iterable]:
    def progress(items: Iterable) -> Iterable:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=description, unit="tensor")

    return progress


def expected_hf_names(config: ModelConfig) -> set[str]:
    return {name for _, row, layer in mapping.expand(config) for name in row.hf_names(layer)}


def _refuse_unexpected(found: set[str], expected: set[str], source: str) -> None:
    unexpected = sorted(found - expected)
    if unexpected:
        raise ValueError(
            f"{source} has {len(unexpected)} tensors the model config does not account for "
            f"(wrong config, or a checkpoint of another model):\n  " + "\n  ".join(unexpected[:50])
        )


def _precision(dtype: str) -> PrecisionConfig:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return PrecisionConfig(params_dtype=DTYPES[dtype], use_transformer_engine=False)


def source_dtype(*checkpoints: HFCheckpoint) -> tuple[str, str]:
    """(dtype, reason): the dtype the source checkpoints store their weights in, so that a
    conversion loses nothing by default. float16 sources and sources that disagree (or do not
    say) convert to float32, which holds them exactly."""
    found = {checkpoint.dtype() for checkpoint in checkpoints}
    if found == {torch.bfloat16}:
        return "bfloat16", "the source's dtype"
    if found == {torch.float32}:
        return "float32", "the source's dtype"
    names = ", ".join(sorted("mixed dtypes" if dtype is None else str(dtype).removeprefix("torch.") for dtype in found))
    return "float32", f"the source stores {names}; float32 holds it exactly"


def _resolve_dtype(dtype: str | None, *checkpoints: HFCheckpoint) -> tuple[str, str]:
    if dtype is None:
        return source_dtype(*checkpoints)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype], "as asked"


def hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, parallel: ParallelConfig, dtype: str | None = None
) -> ConversionReport:
    """Collective over the TP x PP layout already initialised (``distributed.initialize``).
    ``dtype`` None: the source checkpoint's (``source_dtype``)."""
    start = time.perf_counter()
    checkpoint = HFCheckpoint(hf_dir)
    config = from_hf_config(checkpoint.config)
    _refuse_unexpected(checkpoint.names, expected_hf_names(config), str(hf_dir))
    dtype, reason = _resolve_dtype(dtype, checkpoint)
    chunks = build_model_chunks(config, parallel, _precision(dtype), initialize_weights=False)
    mapping.load_hf_weights(
        chunks,
        checkpoint.read,
        checkpoint.names,
        config,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel.tensor_parallel,
        progress=rank0_progress("HF -> Megatron"),
    )
    save_model(chunks, out_dir, config, extra={"source": {"hf": str(hf_dir)}})
    return ConversionReport(
        tensors=len(checkpoint.names),  # each rank used its part; together, all of them
        bytes=checkpoint.nbytes(),
        seconds=time.perf_counter() - start,
        peak_rss_bytes=_max_over_ranks(peak_rss_bytes()),
        dtype=dtype,
        dtype_reason=reason,
    )


# --------------------------------------------------------------------------------------------
# SigLIP + Mistral -> Idefics2
# --------------------------------------------------------------------------------------------


def combined_model_config(
    vision_hf: dict[str, Any], text_hf: dict[str, Any], connector: ConnectorConfig, image_size: int
) -> ModelConfig:
    """Idefics2 config from a SigLIP and a Mistral config.json: vocabulary + 3 image tokens.
    Both are read through transformers' config classes (their defaults fill missing keys) and
    a field that would change either model but is not modelled here is refused by name."""
    vision_recipe = recipe_for_hf("vision", vision_hf.get("model_type") or "siglip_vision_model")
    text_recipe = recipe_for_hf("text", text_hf.get("model_type", ""))
    vision_source, text_source = vision_recipe.hf_config(vision_hf), text_recipe.hf_config(text_hf)
    vision = vision_recipe.from_hf(vision_source, image_size=image_size)
    if image_size % vision.patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of the SigLIP patch size {vision.patch_size}")
    text = text_recipe.from_hf(text_source)
    vocab = text.vocab_size
    written = to_hf_config_dict(ModelConfig(vision=vision, text=text))
    # The position table is resized to image_size on purpose; SigLIP's pooling head is dropped.
    problems = unmodelled_fields(
        vision_source, written["vision_config"], "vision_config.", skip=("image_size", "vision_use_head")
    )
    # Mistral has no padding token; the one Idefics2 adds changes no logit.
    problems += unmodelled_fields(text_source, written["text_config"], "text_config.", skip=("pad_token_id",))
    refuse_unmodelled(problems)
    return ModelConfig(
        vision=vision,
        connector=connector,
        text=dataclasses.replace(text, vocab_size=vocab + 3),
        fake_image_token_id=vocab,
        image_token_id=vocab + 1,
        end_of_utterance_token_id=vocab + 2,
    )


def with_new_token_rows(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """Append ``count`` rows equal to the mean of the existing ones (new tokens start "average")."""
    return torch.cat([matrix, matrix.float().mean(0, keepdim=True).to(matrix.dtype).expand(count, -1)], dim=0)


class SeparateCheckpoints:
    """Presents a standalone vision and a standalone text checkpoint (SigLIP and Mistral for
    Idefics2) under Idefics2's HF names; each recipe says which of its tensors are used and how."""

    def __init__(self, vision: HFCheckpoint, text: HFCheckpoint, config: ModelConfig) -> None:
        self.config = config
        vision_recipe, _, text_recipe = recipes_of(config)
        self.names: dict[
            str, tuple[HFCheckpoint, Any, str, str]
        ] = {}  # name -> (source, recipe, relative, source name)
        self.ignored: list[str] = []
        for part, source, part_recipe in (("vision", vision, vision_recipe), ("text", text, text_recipe)):
            used, ignored = part_recipe.standalone_names(source.names)
            hf_prefix = family_of(config).part_prefixes[part][1]
            for relative, source_name in used.items():
                target = relative[1:] if relative.startswith("/") else hf_prefix + relative
                self.names[target] = (source, part_recipe, relative, source_name)
            self.ignored += ignored

    def read(self, name: str) -> torch.Tensor:
        source, part_recipe, relative, source_name = self.names[name]
        part_config = self.config.vision if part_recipe.part == "vision" else self.config.text
        tensor = part_recipe.adapt_standalone(relative, source.read(source_name), part_config)
        text_prefix = family_of(self.config).part_prefixes["text"][1]
        if name in (f"{text_prefix}embed_tokens.weight", "lm_head.weight"):
            return with_new_token_rows(tensor, 3)  # Idefics2's three image tokens
        return tensor


def separate_to_megatron(
    vision_dir: str | Path,
    text_dir: str | Path,
    out_dir: str | Path,
    parallel: ParallelConfig,
    connector: ConnectorConfig,
    image_size: int,
    dtype: str | None = None,
) -> ConversionReport:
    """Collective: SigLIP + Mistral -> Megatron Idefics2 with a freshly initialised connector.
    ``dtype`` None: the sources' dtype (``source_dtype``)."""
    start = time.perf_counter()
    vision, text = HFCheckpoint(vision_dir), HFCheckpoint(text_dir)
    config = combined_model_config(vision.config, text.config, connector, image_size)
    sources = SeparateCheckpoints(vision, text, config)
    expected = {n for n in expected_hf_names(config) if not n.startswith("model.connector.")}
    _refuse_unexpected(set(sources.names), expected, f"{vision_dir} + {text_dir}")
    dtype, reason = _resolve_dtype(dtype, vision, text)
    chunks = build_model_chunks(config, parallel, _precision(dtype))
    mapping.load_hf_weights(
        chunks,
        sources.read,
        set(sources.names),
        config,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel.tensor_parallel,
        keep_initialized=lambda name: name.startswith("connector."),
        progress=rank0_progress("SigLIP + Mistral -> Megatron"),
    )
    save_model(chunks, out_dir, config, extra={"source": {"vision_hf": str(vision_dir), "text_hf": str(text_dir)}})
    return ConversionReport(
        tensors=len(sources.names),
        bytes=vision.nbytes() + text.nbytes(),
        seconds=time.perf_counter() - start,
        peak_rss_bytes=_max_over_ranks(peak_rss_bytes()),
        ignored=sources.ignored,
        dtype=dtype,
        dtype_reason=reason,
    )


# --------------------------------------------------------------------------------------------
# Megatron -> HF
# --------------------------------------------------------------------------------------------


def megatron_to_hf(
    megatron_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    include_tokenizer: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
) -> ConversionReport:
    """Single process (TP1 x PP1: dist_checkpointing reshards whatever layout saved it)."""
    start = time.perf_counter()
    metadata = read_metadata(megatron_dir)
    config, trainable = model_config_of(metadata), trainable_config_of(metadata)
    precision = _precision(dtype or metadata["dtype"])
    chunks = build_model_chunks(config, ParallelConfig(), precision, initialize_weights=False)
    if trainable.lora_rank:
        apply_trainable(chunks, trainable)
    load_model(chunks, megatron_dir, config, trainable)
    merge_lora(chunks)
    (model,) = chunks
    parameters = dict(model.named_parameters())
    by_canonical = {canonical: parameters[local] for local, canonical in global_parameter_names(model).items()}

    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    report = ConversionReport()
    try:
        for name, row, layer in rank0_progress("Megatron -> HF")(list(mapping.expand(config))):
            full = by_canonical[name].detach()
            for hf_name, tensor in zip(row.hf_names(layer), rows.megatron_to_hf(row, full, config), strict=True):
                writer.add(hf_name, tensor)
                report.tensors += 1
        hf_config = to_hf_config_dict(config)
        hf_config["torch_dtype"] = hf_config["dtype"] = precision.params_dtype
        write_json(writer, "config.json", hf_config)
        if include_tokenizer or tokenizer_dir is not None:
            save_processor(writer.temporary, config, tokenizer_dir)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    report.bytes = writer.total_bytes
    report.seconds = time.perf_counter() - start
    report.peak_rss_bytes = peak_rss_bytes()
    return report


def save_processor(directory: Path, config: ModelConfig, tokenizer_dir: str | Path | None) -> None:
    """Tokenizer (None: the text recipe's, e.g. Mistral-7B's) + the family's processor files,
    checked against the model."""
    from megatron_vlm.data.tokens import image_token_ids, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, name=recipes_of(config)[2].tokenizer)
    ids = image_token_ids(tokenizer)
    if ids["<image>"] != config.image_token_id or len(tokenizer) != config.text.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_dir or recipes_of(config)[2].tokenizer} does not fit the model: <image> id "
            f"{ids['<image>']} vs {config.image_token_id}, {len(tokenizer)} tokens vs vocabulary "
            f"{config.text.vocab_size}; give the directory of the model's own tokenizer (--tokenizer DIR), or "
            "export without tokenizer files"
        )
    family_of(config).processor(config, tokenizer).save_pretrained(str(directory))
