"""Analytic memory per rank of an Idefics2 training run, for any TP / PP / VPP / DP layout.

Per pipeline stage (TP and DP ranks of a stage are alike) it adds up:

- parameters of the stage's chunks (TP-sharded weights, replicated norms/biases/embeddings of the
  vision tower), gradients in Megatron's fp32 grad buffer, Adam state (+ fp32 main weights when
  the weights are bf16), divided over data-parallel ranks under the distributed optimizer;
- activations saved for backward, per micro-batch and chunk, counted tensor by tensor from what
  the kernels keep (``kernels="local"``: Megatron-Core's local spec with torch norms and unfused
  attention, as on CPU; ``"te"``: Transformer Engine's fused norms + flash attention), times the
  micro-batches the pipeline schedule holds in flight (1F1B, interleaved incl. its chunk order);
  with recompute, what the checkpoints keep instead;
- the step's own inputs, and the largest transient: a layer's backward workspace, the logits
  and loss on the last stage, or Adam's update temporaries.

It does not count the runtime itself (interpreter, libraries, CUDA context, communicator
buffers): measurements compare against memory above the process's level before the model is
built (GPU: the allocator's peak). ``tests/test_memory_model.py`` holds it to measured runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_vlm.backbones import ParameterCount, recipes_of
from megatron_vlm.config import ModelConfig, ParallelConfig, TrainableConfig
from megatron_vlm.models.cross_attention import gated_block_parameters, gated_blocks_in

FP32 = 4
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Workload:
    """One micro-batch: ``micro_batch_size`` packed sequences of ``seq_length`` tokens holding
    ``images`` images in all, each padded to ``patches_per_image`` patches (the batch's largest)."""

    micro_batch_size: int
    seq_length: int
    images: int
    patches_per_image: int


@dataclass(frozen=True)
class TrainingSetup:
    parallel: ParallelConfig
    data_parallel: int = 1
    num_microbatches: int = 1  # per step and data-parallel rank
    params_dtype: str = "float32"
    distributed_optimizer: bool = False
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    kernels: str = "local"  # local | te


@dataclass
class StageMemory:
    """Bytes on one rank of a pipeline stage; ``peak`` is the predicted high-water mark."""

    stage: int
    parameters: int
    trainable_parameters: int
    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    inputs: float
    backward_workspace: float
    optimizer_step_workspace: float
    microbatches_in_flight: int

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def peak(self) -> float:
        training = self.activations + self.inputs + self.backward_workspace
        return self.static + max(training, self.inputs + self.optimizer_step_workspace)

    def as_dict(self) -> dict[str, float]:
        values = dataclasses.asdict(self)
        values["peak"] = self.peak
        return values


# --- parameters --------------------------------------------------------------------------------


def vision_parameters(model: ModelConfig) -> ParameterCount:
    return recipes_of(model)[0].parameters(model.vision)


def connector_parameters(model: ModelConfig) -> ParameterCount:
    return recipes_of(model)[1].parameters(model)


def decoder_layer_parameters(model: ModelConfig) -> ParameterCount:
    return recipes_of(model)[2].layer_parameters(model.text)


def decoder_layers_per_chunk(model: ModelConfig, parallel: ParallelConfig) -> list[list[int]]:
    """Decoder layers of each [stage][virtual chunk], as Megatron-Core places them."""
    return [[layers for layers, _ in stage] for stage in _decoder_layer_placement(model, parallel)]


def _decoder_layer_placement(model: ModelConfig, parallel: ParallelConfig) -> list[list[tuple[int, int]]]:
    """(layers, global index of the first) of each [stage][virtual chunk]: Megatron-Core's placement
    (interleaved: chunk v of stage p starts at v x layers/vpp + p x layers/(pp x vpp))."""
    pp, vpp, layers = parallel.pipeline_parallel, parallel.virtual_pipeline or 1, model.text.num_layers
    first = parallel.decoder_layers_in_first_stage
    if first is not None and pp > 1:
        rest = (layers - first) // (pp - 1)
        return [[(first, 0)]] + [[(rest, first + (p - 1) * rest)] for p in range(1, pp)]
    per = layers // (pp * vpp)
    return [[(per, v * layers // vpp + p * per) for v in range(vpp)] for p in range(pp)]


@dataclass(frozen=True)
class ChunkContents:
    decoder_layers: int
    vision: bool  # vision + connector + embeddings (the first chunk of stage 0)
    output: bool  # final norm + output layer + loss (the last chunk of the last stage)
    gated_blocks: int = 0  # the cross-attention architecture's blocks among its decoder layers


def chunks_of_stage(model: ModelConfig, parallel: ParallelConfig, stage: int) -> list[ChunkContents]:
    per_chunk = _decoder_layer_placement(model, parallel)[stage]
    last_stage = parallel.pipeline_parallel - 1
    return [
        ChunkContents(
            layers,
            vision=stage == 0 and index == 0,
            output=stage == last_stage and index == len(per_chunk) - 1,
            gated_blocks=gated_blocks_in(model, first_layer, layers),
        )
        for index, (layers, first_layer) in enumerate(per_chunk)
    ]


def chunk_parameters(
    model: ModelConfig, chunk: ChunkContents, trainable: TrainableConfig
) -> tuple[ParameterCount, ParameterCount]:
    """(all, trainable) parameters of one chunk."""
    vocabulary = ParameterCount(sharded=model.padded_vocab_size * model.text.hidden_size)
    language = decoder_layer_parameters(model) * chunk.decoder_layers
    if chunk.vision:
        language = language + vocabulary
    if chunk.output:
        language = language + vocabulary + ParameterCount(replicated=model.text.hidden_size)
    total, train = language, ParameterCount() if trainable.freeze_language else language
    if chunk.gated_blocks:  # new parts: they train whatever is frozen (models/lora.py)
        blocks = gated_block_parameters(model) * chunk.gated_blocks
        total, train = total + blocks, train + blocks
    if chunk.vision:
        vision, connector = vision_parameters(model), connector_parameters(model)
        total = total + vision + connector
        train = train + (ParameterCount() if trainable.freeze_vision else vision)
        train = train + (ParameterCount() if trainable.freeze_connector else connector)
    return total, train


def model_parameters(model: ModelConfig) -> int:
    """All parameters of the model (every chunk of every stage, unsharded)."""
    whole = ChunkContents(
        model.text.num_layers, vision=True, output=True, gated_blocks=gated_blocks_in(model, 0, model.text.num_layers)
    )
    total, _ = chunk_parameters(model, whole, TrainableConfig())
    return total.sharded + total.replicated


# --- activations ---------------------------------------------------------------------------------


def _attention_scores_bytes(batch: int, heads: int, queries: int, keys: int, e: int, kernels: str) -> float:
    """The score matrix kept for backward: fp32 softmax output, plus its cast copy in 16-bit.
    Flash attention keeps only the per-row log-sum-exp."""
    if kernels == "te":
        return batch * heads * queries * FP32
    return batch * heads * queries * keys * (FP32 + (e if e != FP32 else 0))


def _norm_bytes(width: int, e: int, kernels: str, rms: bool) -> float:
    """Per token. Torch's RMSNorm keeps its input and normalized output in fp32; LayerNorm keeps
    its input; TE's fused norms keep the input."""
    if kernels == "local" and rms:
        return 2 * width * FP32
    return width * e


def decoder_layer_activations(model: ModelConfig, setup: TrainingSetup, tokens: int, batch: int, seq: int) -> float:
    """Bytes one decoder layer keeps for backward for ``tokens`` positions in ``batch`` documents of
    ``seq`` tokens (the micro-batch's real tokens, packed: padding is not computed)."""
    t, tp, e, kernels = model.text, setup.parallel.tensor_parallel, _bytes(setup), setup.kernels
    h, q, kv, inner = (
        t.hidden_size,
        t.num_heads * t.head_dim // tp,
        t.num_kv_heads * t.head_dim // tp,
        t.intermediate_size // tp,
    )
    heads = t.num_heads // tp
    if setup.parallel.recompute == "full":
        return tokens * h * e  # the layer's input
    norms = 2 * _norm_bytes(h, e, kernels, rms=True)
    linear_inputs = 2 * h * e  # qkv and fc1 inputs (the norms' outputs)
    if kernels == "te":
        attention_inputs = (q + 2 * kv) * e + q * e  # q, k, v and the attention output
        mlp = 2 * inner * e + inner * e
    else:
        # PackedSequenceAttention: q, and k, v expanded to every query head, per document; the
        # kernel's output (its backward reads it); the output projection's input (their concatenation).
        attention_inputs = 3 * q * e + q * e + q * e
        mlp = 5 * inner * e  # fc1 output (gate|up), silu(gate), silu(gate) * up, fc2 input copy
    # RoPE over packed documents (Megatron's THD path) keeps per-token cos/sin of q and k.
    rope = 4 * tokens * t.head_dim * e
    # The documents run through flash-style kernels (TE's, torch's varlen / SDPA flash), which keep
    # one log-sum-exp per query and head; a sliding window shorter than a document makes the local
    # spec pass its band as a mask, and that kernel keeps the document's scores.
    if kernels == "local" and t.sliding_window is not None and t.sliding_window < seq:
        scores = _attention_scores_bytes(batch, heads, seq, seq, e, kernels)
    else:
        scores = tokens * heads * FP32
    if setup.parallel.recompute == "selective":  # attention core recomputed: its q, k, v inputs remain
        attention_inputs, scores = (q + 2 * kv) * e + q * e, 0
    return tokens * (norms + linear_inputs + attention_inputs + mlp) + rope + scores


def vision_activations(model: ModelConfig, setup: TrainingSetup, images: int, patches: int) -> float:
    """Vision tower + projection + resampler for ``images`` images of ``patches`` patches each."""
    if images == 0:
        return 0.0
    v, c, t = model.vision, model.connector, model.text
    tp, e, kernels = setup.parallel.tensor_parallel, _bytes(setup), setup.kernels
    h, inner, heads = v.hidden_size, v.intermediate_size // tp, v.num_heads // tp
    tokens = images * patches
    pixels = tokens * v.num_channels * v.patch_size**2 * (e + FP32)  # loader's fp32 pixels + the cast
    if setup.parallel.recompute == "full":
        layer = tokens * h * e
    else:
        per_token = (
            _norm_bytes(h, e, kernels, rms=False) * 2  # two LayerNorm inputs
            + 2 * h * e  # qkv and fc1 inputs
            + 3 * h // tp * e  # qkv output (q, k, v views of it)
            + h // tp * e  # proj input
            + 2 * inner * e  # gelu input and output
        )
        # Each image its own sequence through a flash-style kernel (TE's, torch's varlen / SDPA
        # flash, the CPU flash kernel): one log-sum-exp per query and head.
        scores = images * heads * patches * FP32
        if setup.parallel.recompute == "selective":
            scores = 0
        layer = tokens * per_token + scores
    encoder = pixels + v.num_layers * layer + tokens * _norm_bytes(h, e, kernels, rms=False)
    connector = recipes_of(model)[1]
    if hasattr(connector, "activation_bytes"):  # a connector that accounts for itself (pixel_shuffle)
        return encoder + connector.activation_bytes(model, images, patches, e, tp)
    # Projection (SwiGLU, vision width -> text intermediate -> text hidden).
    projection = tokens * (h * e + 5 * t.intermediate_size // tp * e)
    # Resampler: per layer, the normalized context (+ its fp32 copy), [context; latents] as the
    # k/v input, k and v expanded to every head; latent-side tensors are small (64 per image).
    ht, context = t.hidden_size, patches + c.num_latents
    q_width = c.num_heads * c.head_dim // tp
    context_norm = ht * (FP32 + (e if e != FP32 else 0))
    per_layer = images * (patches * context_norm + context * (ht * e + 2 * q_width * e))
    latent_side = images * c.num_latents * (6 * ht * FP32 + 2 * ht * e + 20 * ht // tp * e)
    resampler = tokens * ht * e + c.depth * (per_layer + latent_side)
    return encoder + projection + resampler


def output_activations(model: ModelConfig, setup: TrainingSetup, tokens: int) -> float:
    """Final norm, output-layer input and the loss's fp32 softmax over the TP vocabulary shard."""
    t, e = model.text, _bytes(setup)
    vocab = model.padded_vocab_size // setup.parallel.tensor_parallel
    return tokens * (_norm_bytes(t.hidden_size, e, setup.kernels, rms=True) + t.hidden_size * e + vocab * FP32)


def gated_block_activations(model: ModelConfig, setup: TrainingSetup, batch: int, seq: int, context: int) -> float:
    """Bytes one gated cross-attention block keeps for backward: ``batch`` rows of ``seq`` tokens,
    each attending a context of ``context`` image tokens."""
    t, tp, e, kernels = model.text, setup.parallel.tensor_parallel, _bytes(setup), setup.kernels
    h, inner, f = t.hidden_size, t.num_heads * t.head_dim // tp, t.intermediate_size // tp
    tokens = batch * seq
    if setup.parallel.recompute == "full":
        return 0.0  # recomputed from the layer's input, which the layer keeps
    per_token = (
        2 * _norm_bytes(h, e, kernels, rms=True)
        + 2 * h * e  # the q projection's and the MLP's inputs (the norms' outputs)
        + 2 * inner * e  # queries, and the attention output (the output projection's input)
        + 2 * h * e  # the gated outputs (tanh(alpha) x output: alpha's gradient needs them)
        + 5 * f * e  # SwiGLU: fc1 output (gate|up), silu(gate), their product, fc2 input copy
    )
    keys = 2 * batch * context * inner * e  # keys and values (the context itself is the chunk's input)
    if model.cross_attention.qk_layer_norms:
        per_token += inner * FP32
        keys += batch * context * inner * FP32
    scores = _attention_scores_bytes(batch, t.num_heads // tp, seq, context, e, kernels)
    return tokens * per_token + keys + scores


def chunk_activations(
    model: ModelConfig, setup: TrainingSetup, chunk: ChunkContents, work: Workload, first_stage: bool
) -> float:
    """One micro-batch through one chunk."""
    b, s, e = work.micro_batch_size, work.seq_length, _bytes(setup)
    tokens = b * s
    total = chunk.decoder_layers * decoder_layer_activations(model, setup, tokens, b, s)
    pipelined = setup.parallel.pipeline_parallel > 1
    context = cross_attention_context(model, work, pipelined)
    sent = s + (context if pipelined else 0)  # under PP the context travels with the hidden states
    if chunk.gated_blocks:
        total += chunk.gated_blocks * gated_block_activations(model, setup, b, s, context)
        total += b * context * model.vision.hidden_size * e  # the context, every block's key and value input
    if chunk.vision:
        total += vision_activations(model, setup, work.images, work.patches_per_image)
    if chunk.output:
        total += output_activations(model, setup, tokens)
    else:
        total += b * sent * model.text.hidden_size * e  # the output sent downstream, kept until its backward
    if not first_stage and e != FP32:
        total += b * sent * model.text.hidden_size * e  # the received input (the first norm keeps an fp32 copy)
    return total


def cross_attention_context(model: ModelConfig, work: Workload, pipelined: bool) -> int:
    """Image tokens of a row's cross-attention context: its image slots x tokens per image. Under
    pipeline parallelism every slot (the P2P shape is fixed); otherwise the most images a row holds,
    at most all of the micro-batch's."""
    if model.architecture != "cross_attention":
        return 0
    slots = model.cross_attention.max_images_per_row
    return (slots if pipelined else min(work.images, slots)) * recipes_of(model)[1].tokens_per_image(model)


def microbatch_input_bytes(work: Workload, model: ModelConfig) -> float:
    """Loader tensors of one micro-batch: ids, positions, labels, loss mask, [b, 1, s, s] mask, pixels."""
    b, s = work.micro_batch_size, work.seq_length
    pixels = work.images * work.patches_per_image * model.vision.patch_size**2 * (model.vision.num_channels * FP32 + 1)
    return b * s * (8 + 8 + 8 + 4 + 8) + b * s * s + pixels


def in_flight_chunks(parallel: ParallelConfig, stage: int, num_microbatches: int) -> list[int]:
    """Model chunk of each (chunk, micro-batch) forward held at the schedule's high-water mark."""
    pp, vpp = parallel.pipeline_parallel, parallel.virtual_pipeline or 1
    total = num_microbatches * vpp
    if pp == 1:
        return [0]
    if vpp == 1:
        return [0] * min(pp - stage, total)
    warmup = min((pp - stage - 1) * 2 + (vpp - 1) * pp, total)
    held = min(warmup + 1, total)
    order = []  # Megatron's schedule table: groups of pp micro-batches, chunk by chunk
    for start in range(0, num_microbatches, pp):
        end = num_microbatches if start + pp >= num_microbatches else start + pp
        order.extend(chunk for chunk in range(vpp) for _ in range(start, end))
    return order[:held]


def _bytes(setup: TrainingSetup) -> int:
    if setup.params_dtype not in _DTYPE_BYTES:
        raise ValueError(f"params_dtype {setup.params_dtype!r}: use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[setup.params_dtype]


def _largest_weight(model: ModelConfig, tp: int, chunks: list[ChunkContents]) -> int:
    t = model.text
    largest = t.hidden_size * 2 * t.intermediate_size // tp if any(c.decoder_layers for c in chunks) else 0
    if any(c.vision or c.output for c in chunks):
        largest = max(largest, model.padded_vocab_size * t.hidden_size // tp)
    return largest


def predict_stage_memory(model: ModelConfig, setup: TrainingSetup, work: Workload, stage: int) -> StageMemory:
    parallel = setup.parallel
    tp, dp, e = parallel.tensor_parallel, setup.data_parallel, _bytes(setup)
    chunks = chunks_of_stage(model, parallel, stage)
    total, trainable = ParameterCount(), ParameterCount()
    for chunk in chunks:
        chunk_total, chunk_trainable = chunk_parameters(model, chunk, setup.trainable)
        total, trainable = total + chunk_total, trainable + chunk_trainable
    params, train = total.per_rank(tp), trainable.per_rank(tp)
    optimizer_bytes = 2 * FP32 + (FP32 if e != FP32 else 0)  # Adam moments (+ fp32 main weights)
    shard = dp if setup.distributed_optimizer else 1
    held = in_flight_chunks(parallel, stage, setup.num_microbatches)
    activations = sum(chunk_activations(model, setup, chunks[c], work, first_stage=stage == 0) for c in held)
    tokens = work.micro_batch_size * work.seq_length
    # Largest transient of a backward: a layer's gradient temporaries (~ its biggest saved
    # tensors twice), the logits + their masked and fp32 copies, a weight gradient before it
    # is added into the grad buffer.
    has_layers = any(c.decoder_layers for c in chunks)
    no_recompute = dataclasses.replace(setup, parallel=dataclasses.replace(parallel, recompute="none"))
    layer = (
        decoder_layer_activations(model, no_recompute, tokens, work.micro_batch_size, work.seq_length)
        if has_layers
        else 0.0
    )
    if parallel.recompute != "none":  # backward first recomputes the layer's forward
        layer *= 2
    workspace = [0.5 * layer, _largest_weight(model, tp, chunks) * e]
    if chunks[-1].output:
        vocab = model.padded_vocab_size // tp
        # Beyond the saved fp32 softmax: the output layer's logits and their masked copy (the
        # same tensor as the fp32 one when weights are fp32); in backward, their gradients.
        workspace.append(tokens * vocab * (e + (e if e != FP32 else 0)))
    # Megatron's unfused attention kept a persistent buffer of the largest score matrix (its global
    # memory buffer); every attention here is a fused kernel over packed sequences, which has none.
    buffers = 0.0
    return StageMemory(
        stage=stage,
        parameters=params,
        trainable_parameters=train,
        weights=params * e,
        gradients=train * FP32,
        optimizer=train * optimizer_bytes / shard,
        buffers=buffers,
        activations=activations,
        inputs=setup.num_microbatches * microbatch_input_bytes(work, model),
        backward_workspace=max(workspace),
        optimizer_step_workspace=train * FP32 / shard,  # Adam's sqrt(v) temporary
        microbatches_in_flight=len(held),
    )


def predict_memory(model: ModelConfig, setup: TrainingSetup, work: Workload) -> list[StageMemory]:
    """Predicted memory of a rank of every pipeline stage."""
    return [predict_stage_memory(model, setup, work, stage) for stage in range(setup.parallel.pipeline_parallel)]
