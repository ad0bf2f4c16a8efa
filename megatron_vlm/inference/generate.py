"""Generation on our model, from a training or converted checkpoint, at any TP/PP/VPP layout.

The prompts of a batch are right-padded rows, one document each (``data.batch``'s micro-batch
format). The prompt is processed once (prefill), packed as in training; each new token then costs
one token's forward per row: its queries attend the keys and values cached by every decoder layer
(``backbones.attention.KVCache``), and a gated cross-attention block's image keys and values are
cached too. Rows that have stopped leave the batch (their document id becomes -1, so the packed
sequence holds only the rows still going).

Pipeline parallelism: the stages run in order (virtual stages chunk by chunk: rank 0's chunk 0,
rank 1's chunk 0, ..., rank 0's chunk 1, ...), each sending its output to the next with one send
and one receive. No shapes are exchanged: every rank of a model-parallel group holds the same
token ids, so each computes the packed length of every step itself (``stage_tokens``). The last
stage picks the next tokens (greedy, or seeded sampling with temperature and top-p) and broadcasts
them down its pipeline; every rank then applies the same stop rules (stop token ids such as EOS and
``<end_of_utterance>``, stop strings, ``max_new_tokens``).

A prompt's output does not depend on what else is in its batch beyond float noise: every row is its
own document, its positions are its own, and sampling draws from a generator seeded per prompt. The
gap between the two largest logits of every step is kept, so callers can report decisions that
were near-ties (where float noise could flip a greedy choice).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_vlm.backbones.attention import KVCache
from megatron_vlm.data.batch import MicroBatch
from megatron_vlm.distributed import collective_device
from megatron_vlm.models.pipeline import unwrapped

STOP_REASONS = ("stop_token", "stop_string", "max_new_tokens")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # a row stops after generating one of these (kept in its output)
    stop_strings: tuple[str, ...] = ()  # ... or once its decoded text contains one of these
    near_tie: float = 1e-4  # a step whose two largest logits are closer than this is a near-tie

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: generate at least one token")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: sampling needs a temperature > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


@dataclasses.dataclass
class Generation:
    """One prompt's output: the generated ids (a stop token included, as transformers' generate)."""

    token_ids: list[int]
    stop_reason: str
    margins: list[float]  # per step: largest logit - second largest
    text: str | None = None

    def near_ties(self, threshold: float) -> list[int]:
        """Steps whose choice was within ``threshold`` of a tie."""
        return [step for step, margin in enumerate(self.margins) if margin < threshold]


@dataclasses.dataclass
class GenerationStats:
    """What generation cost on this rank, summed over calls (the evaluation's inference cost):
    prompt tokens and the seconds of their forward (prefill), generated tokens and the seconds of
    their forwards (decode; the first token comes from the prefill), wall time of whole steps
    (the host waits for each step's tokens, so no device work is left out)."""

    prompts: int = 0
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0

    def add(self, other: GenerationStats) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class _Pipeline:
    """This rank's model chunks, run in pipeline order with point-to-point sends."""

    def __init__(self, chunks: Sequence[torch.nn.Module]) -> None:
        # Without wrappers (DDP's hooks are for gradients: generation has none).
        self.chunks = [unwrapped(chunk) for chunk in chunks]
        self.stages = parallel_state.get_pipeline_model_parallel_world_size()
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        parameter = next(self.chunks[0].parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.hidden = self.chunks[0].config.hidden_size

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def forward(self, inputs: MicroBatch, cache: KVCache) -> torch.Tensor | None:
        """One forward of the whole model: the last stage's logits shard [b, s, V/tp], None elsewhere."""
        output = None
        for index, chunk in enumerate(self.chunks):
            first = self.stage == 0 and index == 0
            last = self.is_last and index == len(self.chunks) - 1
            if not first:
                received = torch.empty(
                    chunk.stage_tokens(*inputs["input_ids"].shape, cache),
                    1,
                    self.hidden,
                    dtype=self.dtype,
                    device=self.device,
                )
                torch.distributed.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
                chunk.set_input_tensor(received)
            output = chunk(**inputs, cache=cache)
            if not last:
                torch.distributed.send(output.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
        return output if self.is_last else None


def _choose(
    logits: torch.Tensor, config: GenerationConfig, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary logits [rows, V] -> next tokens [rows] and the gap between the two largest
    logits [rows] (float32, on the host)."""
    logits = logits.float().cpu()
    top = logits.topk(2, dim=-1).values
    margins = top[:, 0] - top[:, 1]
    if not config.do_sample:
        return logits.argmax(dim=-1), margins
    tokens = torch.empty(logits.shape[0], dtype=torch.long)
    for row, generator in enumerate(generators):
        probabilities = torch.softmax(logits[row] / config.temperature, dim=-1)
        if config.top_p < 1:
            # The smallest set of most likely tokens whose probability reaches top_p (transformers'
            # TopPLogitsWarper: a token stays while the mass before it is below top_p).
            ordered, order = probabilities.sort(descending=True)
            before = ordered.cumsum(0) - ordered
            ordered = ordered.masked_fill(before >= config.top_p, 0.0)
            probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
        tokens[row] = torch.multinomial(probabilities, 1, generator=generator)[0]
    return tokens, margins


@torch.no_grad()
def generate(
    chunks: Sequence[torch.nn.Module],
    prompts: MicroBatch,
    config: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    sample_seeds: Sequence[int] | None = None,
    stats: GenerationStats | None = None,
) -> list[Generation]:
    """Collective over the model-parallel group: continue each prompt row of ``prompts`` (the
    forward inputs of right-padded rows, one document each; ``data.prompts`` builds them) and
    return one ``Generation`` per row on every rank.

    ``decode`` turns generated ids into text (needed for ``stop_strings``; sets ``Generation.text``).
    ``sample_seeds``: one seed per row for sampling (default: the row index), combined with
    ``config.seed``, so that a prompt samples the same tokens in any batch. ``stats``, if given,
    is added this call's tokens and times."""
    if config.stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function (the tokenizer's) to read the generated text")
    pipeline = _Pipeline(chunks)
    device = pipeline.device
    document_ids = prompts["document_ids"]
    rows = document_ids.shape[0]
    real = document_ids >= 0
    if (real[:, 1:] & ~real[:, :-1]).any() or (document_ids > 0).any():
        raise ValueError("prompts must be right-padded rows of one document each (document ids 0, then -1)")
    lengths = real.sum(dim=1).tolist()
    if min(lengths) < 1:
        raise ValueError("every prompt needs at least one token")
    seeds = list(range(rows)) if sample_seeds is None else list(sample_seeds)
    generators = [torch.Generator().manual_seed(config.seed * 1_000_003 + seed) for seed in seeds]
    cache = KVCache(rows, max(lengths) + config.max_new_tokens)
    training = [chunk.training for chunk in pipeline.chunks]
    for chunk in pipeline.chunks:
        chunk.eval()
    outputs = [Generation([], "max_new_tokens", []) for _ in range(rows)]
    used = GenerationStats(prompts=rows, prompt_tokens=sum(lengths))
    active = [True] * rows
    try:
        inputs = {
            name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in prompts.items()
        }
        cache.begin(decoding=False, span=max(lengths))
        last_position = torch.tensor([length - 1 for length in lengths], device=device)
        for step in range(config.max_new_tokens):
            started = time.perf_counter()
            logits = pipeline.forward(inputs, cache)
            tokens = torch.zeros(rows, dtype=torch.long)
            margins = torch.zeros(rows, dtype=torch.float32)
            if logits is not None:
                picked = logits[torch.arange(rows, device=device), last_position]  # [rows, V/tp]
                full = tensor_parallel.gather_from_tensor_model_parallel_region(picked)
                tokens, margins = _choose(full[:, : pipeline.chunks[-1].vocab_size], config, generators)
            tokens, margins = _broadcast_from_last_stage(tokens, margins)  # the host waits for them
            seconds = time.perf_counter() - started
            if step == 0:
                used.prefill_seconds += seconds
            else:
                used.decode_seconds += seconds
                used.decode_steps += 1
            for row in range(rows):
                if not active[row]:
                    continue
                out = outputs[row]
                out.token_ids.append(int(tokens[row]))
                out.margins.append(float(margins[row]))
                if out.token_ids[-1] in config.stop_token_ids:
                    out.stop_reason, active[row] = "stop_token", False
                elif config.stop_strings and any(s in decode(out.token_ids) for s in config.stop_strings):
                    out.stop_reason, active[row] = "stop_string", False
            if not any(active) or step == config.max_new_tokens - 1:
                break
            # The next forward: one token per row still going, at the position after its last.
            positions = torch.tensor([lengths[row] + step for row in range(rows)])
            going = torch.tensor(active)
            next_documents = torch.where(going, 0, -1)[:, None]
            inputs = {
                "input_ids": tokens[:, None].to(device),
                "position_ids": torch.where(going, positions, 0)[:, None].to(device),
                "document_ids": next_documents.to(device),
                "pixel_values": None,
                "pixel_attention_mask": None,
            }
            cache.begin(decoding=True, span=max(lengths) + step + 1)
            last_position = torch.zeros(rows, dtype=torch.long, device=device)
    finally:
        for chunk, was_training in zip(pipeline.chunks, training, strict=True):
            chunk.train(was_training)
    if decode is not None:
        for out in outputs:
            out.text = decode(out.token_ids)
    used.generated_tokens = sum(len(out.token_ids) for out in outputs)
    if stats is not None:
        stats.add(used)
    return outputs


def _broadcast_from_last_stage(tokens: torch.Tensor, margins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last pipeline stage's choice, on every stage of this rank's pipeline (each TP rank of the
    last stage computed the same from the same gathered logits)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return tokens, margins
    packed = torch.cat([tokens.double(), margins.double()]).to(collective_device())
    torch.distributed.broadcast(
        packed,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    packed = packed.cpu()
    rows = tokens.numel()
    return packed[:rows].long(), packed[rows:].float()
