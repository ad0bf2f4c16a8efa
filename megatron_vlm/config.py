"""Configuration dataclasses. Presets are YAML files under ``examples/`` (one file per preset).

A model preset names the numbers of the three parts of Idefics2 (vision encoder, connector, text
decoder); the parallel layout is a separate config so that the same model runs at any TP/PP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
MODEL_PRESETS_DIR = EXAMPLES_DIR / "models"


@dataclass
class VisionConfig:
    """SigLIP encoder at native resolution (Idefics2VisionConfig)."""

    kind: str = "siglip"  # its recipe (megatron_vlm/backbones)
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980  # the position table covers (image_size // patch_size)^2 buckets
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0  # dropout on attention probabilities (training only), as transformers
    # The MLP's activation, by transformers' ACT2FN name: SigLIP gelu_pytorch_tanh, CLIP quick_gelu,
    # Idefics1's CLIP-style tower gelu. Each recipe names the ones it implements.
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ConnectorConfig:
    """SwiGLU modality projection + Perceiver resampler (Idefics2PerceiverConfig).

    The projection maps vision hidden -> text intermediate -> text hidden; the resampler works at
    the text hidden size with an MLP of 4x that width, as in transformers.
    """

    kind: str = "perceiver"  # its recipe (megatron_vlm/backbones)
    num_latents: int = 64
    depth: int = 3
    num_heads: int = 16
    num_kv_heads: int = 4
    head_dim: int = 96
    rms_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    # pixel_shuffle (Idefics3): each s x s block of patches becomes one token of s^2 x the width.
    scale_factor: int = 2
    # Layer norms on queries and keys (Idefics1's perceiver: qk_layer_norms_perceiver).
    qk_layer_norms: bool = False


@dataclass
class CrossAttentionConfig:
    """Gated cross-attention blocks (Flamingo / Idefics1), used when ``ModelConfig.architecture`` is
    ``cross_attention``: one block before every ``interval``-th decoder layer (layers 0, interval,
    2 x interval, ...), its queries the text, its keys and values the image tokens, its output
    added through tanh(alpha) gates that start at 0."""

    interval: int = 4  # transformers' IdeficsConfig.cross_layer_interval
    alpha_type: str = "float"  # float: one gate per block; vector: one per hidden unit
    qk_layer_norms: bool = False  # layer norms on queries and keys (IdeficsConfig.qk_layer_norms)
    # Images a row may hold. Under pipeline parallelism the image tokens travel with the hidden states
    # between stages in a tensor of fixed shape: every row's are padded to this many images.
    max_images_per_row: int = 8


@dataclass
class TextConfig:
    """Mistral decoder. ``vocab_size`` includes the three image tokens (32000 + 3)."""

    kind: str = "mistral"  # its recipe (megatron_vlm/backbones)
    vocab_size: int = 32003
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    # Mistral's sliding-window attention: a token sees itself and the window - 1 tokens before it
    # (within its document). None: full causal attention.
    sliding_window: int | None = None
    attention_dropout: float = 0.0
    # RoPE scaling as Llama configs carry it (transformers' rope_scaling / rope_parameters without
    # rope_theta): {"rope_type": "linear" | "llama3", "factor": ..., ...}. None: plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # Of vocab_size, the last additional_vocab_size tokens (the image tokens Idefics1 added to Llama's
    # vocabulary) are stored apart in the HF checkpoint (transformers' decoupled embedding and LM
    # head); here they are rows of the one table.
    additional_vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"text.sliding_window={self.sliding_window} must be a positive number of tokens (or null)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# How image tokens reach the decoder (the paper's architecture comparison).
ARCHITECTURES = ("fully_autoregressive", "cross_attention")


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # fully_autoregressive: image tokens are spliced into the decoder's sequence (Idefics2/3);
    # cross_attention: the decoder attends to them in gated cross-attention blocks (Idefics1).
    architecture: str = "fully_autoregressive"
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    # The transformers model family the converters read and write (conversion/families):
    # idefics2 | idefics3 | idefics1. Training does not depend on it.
    family: str = "idefics2"
    fake_image_token_id: int = 32000
    image_token_id: int = 32001
    end_of_utterance_token_id: int = 32002
    pad_token_id: int = 0
    # The vocabulary is padded to a multiple of this (TP must divide it); padded logits are
    # masked. Unlike Megatron-LM's multiple-times-TP, the padded size does not depend on the
    # layout, so embedding checkpoints reshard between TP sizes.
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture={self.architecture!r} is not one of {ARCHITECTURES}")

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.text.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved schedule)
    # Decoder layers on pipeline stage 0, which also runs vision + connector (None: even split).
    decoder_layers_in_first_stage: int | None = None
    sequence_parallel: bool = False  # needs TE/apex norms: GPU path only
    recompute: str = "none"  # activations: none | selective (attention cores) | full (every layer)


@dataclass
class TrainableConfig:
    """What trains: the paper freezes or LoRA-adapts the backbones while new parts train fully."""

    freeze_vision: bool = False
    freeze_connector: bool = False
    freeze_language: bool = False
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("vision", "language")
    # DoRA (the paper's fine-tuning, Appendix A.2): the adapters also learn a magnitude per output
    # feature of each adapted linear (models/lora.py); needs lora_rank > 0.
    dora: bool = False

    def __post_init__(self) -> None:
        if self.dora and self.lora_rank <= 0:
            raise ValueError("trainable.dora=true needs adapters: set trainable.lora_rank > 0")


@dataclass
class PrecisionConfig:
    params_dtype: str = "float32"  # float32 | bfloat16
    fp8: str | None = None  # None | "hybrid" (e4m3 forward, e5m2 gradients) | "e4m3"
    # te: Transformer Engine (Hopper); torch: torch._scaled_mm linears (models/fp8.py), also on
    # CPU; auto: TE when it imports with an FP8-capable GPU, else torch.
    fp8_backend: str = "auto"
    use_transformer_engine: bool | None = None  # None: use TE when it imports
    # torch.compile the torch FP8 linears' scaling and casts (models/fp8.py: each cast one fused
    # reduction and one cast pass instead of op by op). Needs fp8 through the torch backend (TE
    # fuses its own casts) and torch.compile's kernels on the device (Triton; a C++ compiler on CPU).
    compile: bool = False

    def __post_init__(self) -> None:
        if self.compile and not self.fp8:
            raise ValueError("precision.compile=true compiles the FP8 linears' casts: it needs precision.fp8")
        if self.compile and self.fp8_backend == "te":
            raise ValueError(
                "precision.compile=true compiles the torch FP8 linears' casts; Transformer Engine fuses its own: "
                "use precision.fp8_backend=torch (or auto without TE), or precision.compile=false"
            )


T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any] | None) -> T:
    """Build a (nested) dataclass from a plain dict, naming unknown keys."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = known[name].default_factory  # type: ignore[misc]
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(default, value)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(known[name].default, float) and isinstance(value, int | str) and not isinstance(value, bool):
            # YAML reads 1e-4 (no dot) as a string: numbers are numbers here.
            try:
                value = float(value)
            except ValueError as error:
                raise ValueError(f"{cls.__name__}.{name}: {value!r} is not a number") from error
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(config: object) -> dict[str, Any]:
    return dataclasses.asdict(config)  # type: ignore[call-overload]


def load_model_preset(name_or_path: str | Path) -> ModelConfig:
    """Read a model preset: a path to a YAML file or a name under ``examples/models/``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = MODEL_PRESETS_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in MODEL_PRESETS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"model preset {name_or_path!r} not found; available: {available}")
    with path.open() as handle:
        return from_dict(ModelConfig, yaml.safe_load(handle))


DATA_LOADING = ("broadcast", "every_rank")


@dataclass
class DataSection:
    mixture: str = "tiny"  # a preset name under examples/data_mixtures/ or a YAML path
    root: str = ""  # where the mixture's shard directories live
    micro_batch_size: int = 1
    image_backend: str = "auto"  # pillow | dali-cpu | dali-gpu | auto
    # Write what each step consumed (step, lane, source, sample positions per micro-batch) to
    # OUTPUT/data_trace/rankNNNNN.jsonl (one writer per data-parallel rank): an audit of the data order.
    trace: bool = False
    # Steps of micro-batches read, decoded and packed ahead in a background thread while the current
    # step trains (training/data_feed.py); 0: each step's are made when it starts. Checkpoints hold the
    # data stream's position after the last step trained, not after what was prefetched.
    prefetch: int = 2
    # Who reads and decodes a data-parallel rank's micro-batches. broadcast: only tensor-parallel rank 0
    # of the first pipeline stage; it sends them to its tensor-parallel peers, and everything but the
    # pixels (which only the first stage's vision tower reads) to the later pipeline stages.
    # every_rank: each rank of the model-parallel group loads the same micro-batches itself.
    loading: str = "broadcast"

    def __post_init__(self) -> None:
        if not isinstance(self.prefetch, int) or isinstance(self.prefetch, bool) or self.prefetch < 0:
            raise ValueError(f"data.prefetch={self.prefetch!r}: give the steps to prefetch, 0 or more (0: none)")
        if self.loading not in DATA_LOADING:
            raise ValueError(f"data.loading={self.loading!r} is not one of {DATA_LOADING}")


@dataclass
class BenchmarkConfig:
    """Benchmark scores during pretraining (``training/benchmarks.py``): every ``interval`` steps and
    at the end, the first ``questions`` of each task's evaluation split, ``shots``-shot as the paper;
    the scores go to TensorBoard (``benchmark/<task>/<metric>``, ``benchmark/average``), the log and
    results.json, against steps, images and text tokens seen."""

    tasks: dict[str, str] = field(default_factory=dict)  # task -> its data (relative to data.root)
    interval: int = 0  # 0: no benchmarks
    questions: int = 32  # the first N questions of each task (0: all of them)
    shots: int = 4
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: each task's own

    def __post_init__(self) -> None:
        if self.interval < 0 or self.questions < 0 or self.shots < 0 or self.batch_size < 1:
            raise ValueError(f"training.benchmarks out of range: {self}")
        if self.interval and not self.tasks:
            raise ValueError("training.benchmarks.interval is set but no tasks are named (tasks: {vqav2: PATH, ...})")


@dataclass
class TrainingConfig:
    global_batch_size: int = 8
    train_steps: int = 100
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    lr_decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    save_interval: int = 100
    keep_last: int = 3
    output_dir: str = "runs/default"  # checkpoints/ and tensorboard/ go here
    load_weights: str | None = None  # a converted checkpoint to start from (when not resuming)
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    # Distributed optimizer: all-gather each updated parameter shard during the next forward (one
    # bucket ahead) instead of right after the optimizer step (training/step.py wrap_ddp).
    overlap_param_gather: bool = False
    max_nonfinite_steps: int = 10  # skipped NaN/Inf steps tolerated before stopping
    # Stragglers (training/stragglers.py): every straggler_interval steps (0: never) one step is timed
    # phase by phase on every rank; a rank whose data + compute time exceeds the median of its
    # data-parallel peers' by more than straggler_margin (0.5: 50%) on straggler_samples timed steps
    # in a row is named in the log.
    straggler_interval: int = 50
    straggler_margin: float = 0.5
    straggler_samples: int = 3
    # NEFTune (models/neftune.py): noise on the text embeddings while training, uniform in
    # ±alpha / sqrt(L d); 0 (off) or the NEFTune paper's 5-15. Instruction fine-tuning uses it.
    neftune_alpha: float = 0.0
    # Checkpoints written in the background (training/async_save.py): the state is copied to host
    # memory at the save step and published at a later step; false: each save completes in place.
    async_save: bool = True
    # A rank silent for longer than this during a training step makes the others exit naming it
    # (distributed.heartbeat); it must exceed the longest step. Saves, loads, evaluation and
    # start-up are collective too but legitimately long: they get checkpoint_timeout_s.
    collective_timeout_s: float = 600.0
    checkpoint_timeout_s: float = 1800.0
    # Start-up check that a checkpoint save fits the batch script's preemption lead time (USR1 sent
    # preemption_lead_s before the time limit: slurm/pretrain_idefics2.sh's --signal=B:USR1@300) at
    # checkpoint_write_gbps (the filesystem's aggregate write rate in GB/s; 0: measured by rank 0).
    preemption_lead_s: float = 300.0
    checkpoint_write_gbps: float = 0.0
    # Validation (data/validation.py): every eval_interval steps and once more at the end, the loss
    # per source on eval_samples fixed held-out samples of each source's validation split
    # (0: no evaluation). Sources without a split are named at start-up and not evaluated.
    eval_interval: int = 0
    eval_samples: int = 32
    benchmarks: BenchmarkConfig = field(default_factory=BenchmarkConfig)


WANDB_MODES = ("online", "offline")


@dataclass
class WandbConfig:
    """Weights & Biases (``training/metrics.py``): the scalars that go to TensorBoard and the run
    config, from the one rank that writes TensorBoard; a restarted run continues the same W&B run
    (its id is kept in OUTPUT/wandb_run_id). Credentials and the server come from wandb's own
    settings (``wandb login``, WANDB_API_KEY, WANDB_BASE_URL)."""

    project: str = ""  # "": no W&B
    entity: str | None = None
    name: str | None = None  # the run's display name (default: the output directory's name)
    mode: str = "online"  # online | offline (written under OUTPUT/wandb; `wandb sync` uploads it later)
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb.mode={self.mode!r} is not one of {WANDB_MODES}")


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _apply_override(values: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ValueError(f"override {override!r} is not KEY=VALUE (e.g. training.lr=3e-4)")
    key, raw = override.split("=", 1)
    *path, leaf = key.split(".")
    if path and path[0] == "model" and isinstance(values.get("model"), str):
        # A model named by preset, with one of its values changed: the preset, then the change.
        values["model"] = {"preset": values["model"]}
    section = values
    for part in path:
        section = section.setdefault(part, {})
        if not isinstance(section, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    section[leaf] = yaml.safe_load(raw)


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A run config YAML (see examples/*.yaml) with ``section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"config {path} not found; presets: {sorted(p.name for p in EXAMPLES_DIR.glob('*.yaml'))}"
        )
    values = yaml.safe_load(path.read_text()) or {}
    for override in overrides:
        _apply_override(values, override)
    model = values.pop("model", "tiny")
    if isinstance(model, str):
        preset = load_model_preset(model)
        values["model"] = to_dict(preset)
    elif isinstance(model, dict) and "preset" in model:
        preset = to_dict(load_model_preset(model.pop("preset")))
        for section, entries in model.items():
            if isinstance(entries, dict):
                preset[section].update(entries)
            else:
                preset[section] = entries
        values["model"] = preset
    else:
        values["model"] = model
    return from_dict(RunConfig, values)
