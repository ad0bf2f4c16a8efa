"""Run under torchrun: the trainer's data feed with per-rank loading (``data.loading=broadcast``,
prefetch on) at a TP x PP layout, checked on every rank against the micro-batches the rank loads
itself (a second loader, synchronous). Writes ``rank{N}.json`` into --out with what it saw; the
assertions that need every rank's view are the test's.

Per step, on every rank: the keys its stage reads (the first stage: every model input; later
stages: no pixels) and every tensor bit for bit equal to its own loader's, the metadata equal, the
stream's state equal to its own loader's; then a resume from the saved state continues identically.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from megatron.core import parallel_state

    from megatron_vlm import distributed
    from megatron_vlm.backbones import recipes_of, text_tokens_per_image
    from megatron_vlm.config import ParallelConfig, load_run_config
    from megatron_vlm.data.loader import MultimodalLoader, load_data_config, merge_states
    from megatron_vlm.data.tokens import load_tokenizer
    from megatron_vlm.distributed import all_gather_object
    from megatron_vlm.training.data_feed import DataFeed, stage_inputs

    model = load_run_config(Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml").model
    distributed.initialize(ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp), model, seed=1234)
    data = load_data_config("tiny", args.data_root, micro_batch_size=2, image_backend="pillow", seed=7)
    tokenizer = load_tokenizer(name=recipes_of(model)[2].tokenizer)

    def loader() -> MultimodalLoader:
        return MultimodalLoader(
            data,
            tokenizer,
            text_tokens_per_image(model),
            model.image_token_id,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            lanes=2,
        )

    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    own = loader()  # what this rank would load itself
    feed = DataFeed(loader(), micro_batches=2, model_config=model, prefetch=2, loading="broadcast")

    def check(step, index: int) -> dict:
        assert [m["lane"] for m in step.meta] == [0, 1], step.meta
        for got, meta in zip(step.inputs, step.meta, strict=True):
            expected = next(own)
            assert set(got) == set(stage_inputs(first)), (sorted(got), first)
            for name, tensor in got.items():
                assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), (index, name)
            for name in ("source", "lane", "positions", "num_images", "num_tokens"):
                assert meta[name] == expected[name], (index, name)
        assert step.state == json.loads(json.dumps(own.state_dict())), index
        return {"pixels": "pixel_values" in step.inputs[0], "images": sum(m["num_images"] for m in step.meta)}

    seen = [check(feed.next_step(), index) for index in range(args.steps)]
    # The checkpoint's view: every rank's state merged (they must agree), then a fresh feed resumes.
    saved = merge_states(all_gather_object(feed.state_dict()))
    feed.close()
    decoded_before_resume = feed.loader.decoded_images
    resumed = DataFeed(loader(), micro_batches=2, model_config=model, prefetch=2, loading="broadcast")
    resumed.load_state_dict(saved)
    seen += [check(resumed.next_step(), args.steps + index) for index in range(2)]
    resumed.close()
    args.out.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank()
    (args.out / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
                "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                "decoded": decoded_before_resume,
                "decoded_resumed": resumed.loader.decoded_images,
                "decoded_own": own.decoded_images,
                "steps": seen,
            }
        )
    )
    distributed.shutdown()


if __name__ == "__main__":
    main()
