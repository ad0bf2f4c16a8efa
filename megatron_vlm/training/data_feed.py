"""The trainer's micro-batches: made ahead of use (``data.prefetch``) and loaded once per
model-parallel group (``data.loading``), with the data stream's state describing what was trained.

* Prefetch: one step's micro-batches at a time are made in a background thread
  (``data/prefetch.py``), each step paired with the loader's ``state_dict()`` taken right after it.
  The feed's ``state_dict()`` is the pair of the last step handed out, so a checkpoint holds the
  position after the steps the model trained on, not after the ones prefetched, and a resumed
  run continues with the first step not trained. Host tensors are pinned when CUDA is there, so
  their copies to the GPU are asynchronous.
* Per-rank loading (``broadcast``): within a data-parallel rank's model-parallel group only
  tensor-parallel rank 0 of the first pipeline stage reads and decodes. It sends every model input
  to its tensor-parallel peers, and the first stage's ranks send all but the pixels
  (``PIXEL_INPUTS``: only the vision tower, on the first stage, reads them) along their pipeline
  groups; the metadata (source, lane, sample positions, the FLOP and patch counts, which need the
  pixel masks, and the stream's state) travels with them, so every rank logs, traces and saves the
  same. The later stages cannot build their micro-batches from tokens alone: whether a sample is
  usable (and so the token layout) is known only once its images are decoded (a corrupt image
  skips the sample), so they receive the layout rather than recompute it.
* A stage's tensors are on the device; the pixels are not moved to a device that does not use them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_vlm import distributed
from megatron_vlm.backbones import recipes_of, text_tokens_per_image
from megatron_vlm.config import ModelConfig, RunConfig
from megatron_vlm.data.batch import MODEL_INPUTS
from megatron_vlm.data.loader import DataConfig, MultimodalLoader, load_data_config
from megatron_vlm.data.prefetch import Prefetcher
from megatron_vlm.data.tokens import image_token_ids, load_tokenizer
from megatron_vlm.perf.flops import batch_training_flops, real_patches, vision_positions

# Model inputs only the first pipeline stage reads (the vision tower's).
PIXEL_INPUTS = tuple(name for name in MODEL_INPUTS if name.startswith("pixel_"))


def run_data_config(run: RunConfig) -> DataConfig:
    """The run's mixture as the trainer reads it: the vision encoder's pixel normalization (unless
    the mixture sets one), the run's micro-batch size, image backend and seed."""
    vision = recipes_of(run.model)[0]
    return load_data_config(
        run.data.mixture,
        run.data.root,
        normalization=(vision.image_mean, vision.image_std),
        micro_batch_size=run.data.micro_batch_size,
        image_backend=run.data.image_backend,
        seed=run.training.seed,
    )


def run_loader(
    run: RunConfig, data: DataConfig, dp_rank: int = 0, dp_size: int = 1, lanes: int | None = None
) -> MultimodalLoader:
    """The loader of ``data`` for the run's model: its text recipe's tokenizer (checked against the
    model's <image> id), its <image> tokens per image, its family's chat template for conversations."""
    tokenizer = load_tokenizer(name=recipes_of(run.model)[2].tokenizer)
    if image_token_ids(tokenizer)["<image>"] != run.model.image_token_id:
        raise ValueError("the tokenizer's <image> id differs from the model's image_token_id")
    return MultimodalLoader(
        data,
        tokenizer,
        text_tokens_per_image(run.model),
        run.model.image_token_id,
        dp_rank,
        dp_size,
        lanes=lanes,
        family=run.model.family,
    )


def stage_inputs(first_stage: bool) -> tuple[str, ...]:
    """The model inputs a pipeline stage reads: all on the first, all but the pixels on the others."""
    return MODEL_INPUTS if first_stage else tuple(name for name in MODEL_INPUTS if name not in PIXEL_INPUTS)


@dataclass
class Step:
    """One step's micro-batches on this rank: their tensors (the keys its stage reads, on the device)
    and metadata (the loader's: source, lane, positions, num_images, num_tokens; the feed's: flops,
    patches, vision_positions), and the data stream's state after them (this rank's lanes)."""

    inputs: list[dict[str, torch.Tensor]]
    meta: list[dict[str, Any]]
    state: dict[str, Any]


def _split(batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {name: value for name, value in batch.items() if name in MODEL_INPUTS}
    meta = {name: value for name, value in batch.items() if not isinstance(value, torch.Tensor)}
    return tensors, meta


class DataFeed:
    """Steps of micro-batches for this rank (see the module docstring). Collective in ``broadcast``
    mode: every rank of a model-parallel group calls ``next_step()`` at the same point."""

    def __init__(
        self,
        loader: MultimodalLoader,
        micro_batches: int,
        model_config: ModelConfig,
        prefetch: int = 2,
        loading: str = "broadcast",
        device: torch.device | str = "cpu",
    ) -> None:
        if loading not in ("broadcast", "every_rank"):
            raise ValueError(f"data loading {loading!r} is not 'broadcast' or 'every_rank'")
        if micro_batches < 1:
            raise ValueError(f"a step needs at least one micro-batch, got {micro_batches}")
        self.loader, self.micro_batches, self.model_config = loader, micro_batches, model_config
        self.loading, self.device = loading, torch.device(device)
        self.first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        # Whether this rank reads and decodes (in broadcast mode, one rank per model-parallel group).
        self.loads = loading == "every_rank" or (
            self.first_stage and parallel_state.get_tensor_model_parallel_rank() == 0
        )
        self.keys = stage_inputs(self.first_stage)
        self.pin = torch.cuda.is_available()
        self.prefetcher: Prefetcher[Step] | None = (
            Prefetcher(self._produce, prefetch, name="data prefetch") if self.loads else None
        )
        self._state = loader.state_dict()  # a fresh loader's: nothing read yet, nothing decoded

    # -- the loading rank --------------------------------------------------------------------

    def _produce(self) -> Step:
        """One step read, decoded and packed (in the prefetch thread), with the state after it."""
        inputs, metas = [], []
        for _ in range(self.micro_batches):
            batch = next(self.loader)
            tensors, meta = _split(batch)
            patches = real_patches(self.model_config, batch)
            meta["flops"] = batch_training_flops(self.model_config, batch)
            meta["patches"] = sum(patches)
            meta["vision_positions"] = vision_positions(self.model_config, patches)
            if self.pin:
                tensors = {k: t.pin_memory() if t.device.type == "cpu" else t for k, t in tensors.items()}
            inputs.append(tensors)
            metas.append(meta)
        return Step(inputs, metas, self.loader.state_dict())

    # -- every rank --------------------------------------------------------------------------

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the whole stream's ``state`` (a checkpoint's): only a loading rank reads (and
        decodes) the documents it had pending; the others keep their lanes' part. Before the first step."""
        if self.prefetcher is not None and self.prefetcher.alive:
            raise RuntimeError("the data feed's state can only be loaded before its first step")
        if self.loads:
            self.loader.load_state_dict(state)
        self._state = self.loader.own_state(state)

    def next_step(self) -> Step:
        """This rank's next step (collective in broadcast mode)."""
        step = next(self.prefetcher) if self.prefetcher is not None else None
        if self.loading == "broadcast":
            if self.first_stage and self.tp_size > 1:
                step = self._broadcast(
                    step,
                    MODEL_INPUTS,
                    parallel_state.get_tensor_model_parallel_src_rank(),
                    parallel_state.get_tensor_model_parallel_group(),
                )
            if self.pp_size > 1:
                step = self._broadcast(
                    step,
                    stage_inputs(False),
                    parallel_state.get_pipeline_model_parallel_first_rank(),
                    parallel_state.get_pipeline_model_parallel_group(),
                )
        if step is None:  # cannot happen: a rank that does not load receives
            raise RuntimeError("this rank neither loads nor receives micro-batches")
        step.inputs = [
            {name: batch[name].to(self.device, non_blocking=True) for name in self.keys if name in batch}
            for batch in step.inputs
        ]
        self._state = step.state
        return step

    def _broadcast(self, step: Step | None, keys: tuple[str, ...], src: int, group: Any) -> Step:
        tensors = None
        if step is not None and torch.distributed.get_rank() == src:
            tensors = {f"{i}/{name}": batch[name] for i, batch in enumerate(step.inputs) for name in keys}
        meta = None if tensors is None else {"meta": step.meta, "state": step.state}
        received, meta = distributed.broadcast_tensors(tensors, meta, src, group, distributed.collective_device())
        if tensors is not None:  # the sender keeps all its tensors (the pixels too); the meta as sent
            return Step(step.inputs, meta["meta"], meta["state"])
        inputs: list[dict[str, torch.Tensor]] = [{} for _ in meta["meta"]]
        for key, tensor in received.items():
            index, name = key.split("/", 1)
            inputs[int(index)][name] = tensor
        return Step(inputs, meta["meta"], meta["state"])

    def state_dict(self) -> dict[str, Any]:
        """The data stream's position after the last step handed out (this rank's lanes; the same
        on every rank of a model-parallel group)."""
        return self._state

    @property
    def skipped(self) -> Counter:
        """Samples skipped by this rank's lanes up to the last step handed out, by reason."""
        return sum((Counter(lane["skipped"]) for lane in self._state["lane_states"].values()), Counter())

    def close(self) -> None:
        """Stop the prefetch thread (end of training, preemption, an error)."""
        if self.prefetcher is not None:
            self.prefetcher.close()
