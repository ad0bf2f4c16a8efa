"""Start-up checks: can this run configuration start on this machine, and what will it build?

Every decision the model build takes from the machine (Transformer Engine or the local spec, FP8
through TE or torch, which parts run FP8, how LoRA attaches to the linears) is judged here, before
any process group or weight exists, and every problem is reported at once with its fix. The
machine's answers come from ``backend``'s capability checks, so a test can force them (say, "TE
imports on an FP8 GPU") and run exactly the checks the trainer runs on such a machine.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_vlm import backend
from megatron_vlm.backbones import common, recipes_of
from megatron_vlm.config import ModelConfig, RunConfig
from megatron_vlm.distributed import layout_problems
from megatron_vlm.models.cross_attention import check_cross_attention
from megatron_vlm.models.fp8 import te_fp8_parts
from megatron_vlm.models.lora import BACKBONES, linear_kind, unadaptable

if TYPE_CHECKING:
    from megatron_vlm.data.images import ImageConfig
    from megatron_vlm.data.loader import DataConfig


@dataclass
class StartupPlan:
    """What the build will do, for the start-up log."""

    transformer_engine: bool
    fp8_backend: str | None  # "te", "torch" or None (no FP8)
    fp8_parts: dict[str, str | None] = field(default_factory=dict)  # part -> why it runs without FP8
    lora: dict[str, dict[str, str]] = field(default_factory=dict)  # backbone -> linear -> how adapted
    sequence_lengths: tuple[int, ...] = ()

    def describe(self) -> str:
        lines = [f"layer spec: {'Transformer Engine' if self.transformer_engine else 'Megatron-Core local'}"]
        if self.fp8_backend:
            parts = ", ".join(
                f"{part}: {'FP8' if reason is None else 'no FP8 (' + reason + ')'}"
                for part, reason in self.fp8_parts.items()
            )
            lines.append(f"FP8 through {self.fp8_backend}" + (f"; {parts}" if parts else ""))
        for backbone, linears in self.lora.items():
            lines.append(f"LoRA on {backbone}: " + ", ".join(f"{n} ({how})" for n, how in linears.items()))
        return "; ".join(lines)


def _data_config(run: RunConfig) -> DataConfig:
    from megatron_vlm.data.loader import load_data_config

    return load_data_config(run.data.mixture, run.data.root)


def image_size_problem(model: ModelConfig, image: ImageConfig, mixture: str) -> str | None:
    """Why the mixture's images do not fit the model: a vision encoder at a fixed square resolution
    (CLIP), or a connector needing the same token count from every image (mlp, under SigLIP too),
    takes every image resized square at the encoder's image_size."""
    vision, connector, _ = recipes_of(model)
    if getattr(vision, "fixed_resolution", False):
        why = f"vision kind {model.vision.kind!r} takes images at exactly its image_size"
    elif getattr(connector, "fixed_tokens_per_image", False):
        why = f"connector kind {model.connector.kind!r} needs the same number of vision tokens from every image"
    else:
        return None
    size = model.vision.image_size
    if image.resize == "square" and image.longest_edge == size:
        return None
    return (
        f"{why}: the data mixture {mixture!r} must set image.resize: square and image.longest_edge: {size} "
        f"(it has resize={image.resize!r}, longest_edge={image.longest_edge})"
    )


def check_batch_layout(run: RunConfig, world_size: int) -> int:
    """Micro-batches per step on each data-parallel rank; refuses impossible batch sizes."""
    parallel = run.parallel
    data_parallel = world_size // (parallel.tensor_parallel * parallel.pipeline_parallel)
    per_step = run.data.micro_batch_size * data_parallel
    if not 0 <= run.training.warmup_steps < run.training.train_steps:
        raise ValueError(
            f"warmup_steps={run.training.warmup_steps} must be smaller than train_steps={run.training.train_steps}"
        )
    for name in ("log_interval", "save_interval"):  # step counts taken modulo these
        if getattr(run.training, name) < 1:
            raise ValueError(f"{name}={getattr(run.training, name)} must be at least 1 (steps)")
    for name in ("collective_timeout_s", "checkpoint_timeout_s", "preemption_lead_s"):  # NaN fails this too
        if not getattr(run.training, name) > 0:
            raise ValueError(f"{name}={getattr(run.training, name)} must be a positive number of seconds")
    if (
        run.training.straggler_interval < 0
        or run.training.straggler_samples < 1
        or not run.training.straggler_margin > 0
    ):
        raise ValueError(
            f"straggler_interval={run.training.straggler_interval} (steps, 0: never), straggler_margin="
            f"{run.training.straggler_margin} (> 0) and straggler_samples={run.training.straggler_samples} (>= 1)"
        )
    if not run.training.neftune_alpha >= 0:
        raise ValueError(f"neftune_alpha={run.training.neftune_alpha} must be >= 0 (0: no NEFTune noise)")
    if not run.training.checkpoint_write_gbps >= 0:
        raise ValueError(
            f"checkpoint_write_gbps={run.training.checkpoint_write_gbps} must be >= 0 (GB/s; 0: measured at start-up)"
        )
    if run.training.checkpoint_timeout_s < run.training.collective_timeout_s:
        raise ValueError(
            f"checkpoint_timeout_s={run.training.checkpoint_timeout_s} is shorter than collective_timeout_s="
            f"{run.training.collective_timeout_s}: saves and evaluation would get less time than a step"
        )
    if run.training.overlap_param_gather and not run.training.distributed_optimizer:
        raise ValueError(
            "overlap_param_gather=true overlaps the distributed optimizer's parameter all-gather: it needs "
            "distributed_optimizer=true"
        )
    if run.training.eval_interval < 0:
        raise ValueError(f"eval_interval={run.training.eval_interval} must be >= 0 (0: no evaluation)")
    if run.training.eval_samples < 1:
        raise ValueError(f"eval_samples={run.training.eval_samples} must be at least 1 (validation samples per source)")
    if run.training.global_batch_size % per_step:
        raise ValueError(
            f"global batch {run.training.global_batch_size} is not divisible by micro batch "
            f"{run.data.micro_batch_size} x data parallel {data_parallel} = {per_step}; use a multiple of {per_step}"
        )
    return run.training.global_batch_size // per_step


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def startup_problems(run: RunConfig, world_size: int) -> tuple[StartupPlan, list[str]]:
    """The plan, and every reason the run cannot start (empty when it can)."""
    model, parallel, precision = run.model, run.parallel, run.precision
    problems = list(layout_problems(model, parallel, world_size))
    if not problems:
        try:
            check_batch_layout(run, world_size)
        except ValueError as error:
            problems.append(str(error))
    try:
        use_te = common.use_transformer_engine(precision)
    except RuntimeError as error:
        problems.append(str(error))
        use_te = False
    fp8 = None
    if precision.fp8:
        try:
            fp8 = backend.fp8_backend(precision.fp8_backend)
        except (RuntimeError, ValueError) as error:
            problems.append(str(error))
    plan = StartupPlan(transformer_engine=use_te, fp8_backend=fp8)
    data = _data_config(run)
    lengths = tuple(sorted({source.seq_len for source in data.sources}))
    plan.sequence_lengths = lengths
    if problem := image_size_problem(model, data.image, run.data.mixture):
        problems.append(problem)
    if model.architecture == "cross_attention":
        try:
            check_cross_attention(model, parallel)
        except ValueError as error:
            problems.append(str(error))
        most = model.cross_attention.max_images_per_row
        if data.max_images_per_sequence > most:  # a packed sequence is a row of the micro-batch
            problems.append(
                f"the data mixture {run.data.mixture!r} packs up to max_images_per_sequence="
                f"{data.max_images_per_sequence} images per sequence, above model.cross_attention."
                f"max_images_per_row={most} (the image context of a row has that many slots)"
            )

    # Sequence parallelism and TE's FP8 GEMMs need no particular sequence length: the decoder pads
    # each micro-batch's packed tokens to the multiple they need (models.idefics2.token_multiple).
    if fp8 == "torch" and parallel.sequence_parallel:
        problems.append(
            "FP8 through torch (_scaled_mm) does not support sequence parallelism: turn sequence_parallel off "
            "or run FP8 through Transformer Engine"
        )
    if fp8 == "te":
        plan.fp8_parts = te_fp8_parts(model, parallel)

    if run.trainable.lora_rank > 0:
        unknown = sorted(set(run.trainable.lora_targets) - set(BACKBONES))
        if unknown:
            problems.append(f"unknown LoRA targets {unknown}; choose from {sorted(BACKBONES)}")
        for backbone in sorted(set(run.trainable.lora_targets) & set(BACKBONES)):
            vision, _, text = recipes_of(model)
            try:
                if backbone == "vision":
                    config = vision.transformer_config(model.vision, parallel, precision, initialize=False)
                else:
                    config = text.transformer_config(model, parallel, precision, initialize=False)
            except (ValueError, AssertionError) as error:
                problems.append(f"{backbone} config: {error}")
                continue
            linears = common.layer_linears(config, use_te)
            refused = unadaptable(linears)
            problems.extend(f"LoRA on {backbone}: {reason}" for reason in refused)
            if not refused:
                plan.lora[backbone] = {
                    name: cls + (" via its layer-norm output" if linear_kind(cls).layernorm_input else "")
                    for name, cls in linears.items()
                }
    if run.logging.wandb.project and not _importable("wandb"):
        problems.append(
            f"logging.wandb.project={run.logging.wandb.project!r} asks for Weights & Biases, but wandb is not "
            "installed (pip install wandb, or leave logging.wandb.project empty)"
        )
    return plan, problems


def check_run(run: RunConfig, world_size: int) -> StartupPlan:
    """``startup_problems`` that raises with every problem listed."""
    plan, problems = startup_problems(run, world_size)
    if problems:
        raise ValueError("this run cannot start:\n  " + "\n  ".join(problems))
    return plan


def predicted_checkpoint_bytes(run: RunConfig) -> int:
    """Bytes of one training checkpoint of the whole job: the model in its parameter dtype, and Adam's
    two fp32 moments (plus the fp32 main copy with bf16 parameters) for every trainable parameter
    (tested against the tiny preset's written checkpoint). LoRA: the targeted backbones' base weights
    are frozen (models/lora.py); the adapters themselves, the RNG and the loader states are small and
    not counted."""
    from megatron_vlm.perf.memory_model import ChunkContents, chunk_parameters, decoder_layer_parameters

    model, trainable = run.model, run.trainable
    lora = set(trainable.lora_targets) if trainable.lora_rank > 0 else set()
    frozen = dataclasses.replace(trainable, freeze_vision=trainable.freeze_vision or "vision" in lora)
    whole = ChunkContents(model.text.num_layers, vision=True, output=True)
    total, train = chunk_parameters(model, whole, frozen)
    train_count = train.sharded + train.replicated
    if "language" in lora and not trainable.freeze_language:  # decoder layers frozen, embeddings train
        layers = decoder_layer_parameters(model) * model.text.num_layers
        train_count -= layers.sharded + layers.replicated
    low_precision = run.precision.params_dtype != "float32"
    model_bytes = (total.sharded + total.replicated) * (2 if low_precision else 4)
    return model_bytes + train_count * (8 + (4 if low_precision else 0))


def checkpoint_time_warning(run: RunConfig, bytes_per_second: float, measured: bool) -> str | None:
    """A warning with the numbers when a save would not fit the preemption lead time, else None."""
    size = predicted_checkpoint_bytes(run)
    seconds = size / bytes_per_second
    lead = run.training.preemption_lead_s
    if seconds <= lead:
        return None
    source = (
        "measured by one writer at start-up (a parallel filesystem may take more at once: set "
        "training.checkpoint_write_gbps to its aggregate rate)"
        if measured
        else "training.checkpoint_write_gbps"
    )
    return (
        f"a checkpoint save is predicted to take {seconds:.0f} s ({size / 1e9:.1f} GB at {bytes_per_second / 1e9:.3g} "
        f"GB/s, {source}), longer than the {lead:g} s between the time-limit signal and the limit "
        f"(training.preemption_lead_s, the batch script's --signal=B:USR1@{lead:g}): the checkpoint written on "
        f"the signal would be cut off and the run resume from the previous one. Send the signal earlier "
        f"(--signal=B:USR1@{seconds * 1.5:.0f}), or write to a faster filesystem"
    )
