"""Run under torchrun (2 ranks): the collective-timeout heartbeat without a model.

1. Every rank enters a training step allowed ``--step-timeout`` seconds (the process groups'
   timeout becomes a little longer, distributed._backstop), then a checkpoint save allowed
   ``--long-timeout``; in the save rank 1 stays away (sleeps) for longer than the step phase's
   group timeout while rank 0 waits for it in a barrier: neither the heartbeat nor gloo may trip.
2. Steps 2 and 3: with MEGATRON_VLM_TEST_HANG_AT_STEP=1:3:stop rank 1 freezes in step 3, and
   rank 0, waiting in a barrier, must exit naming it.
Prints "save survived" after 1 and "finished" if nothing tripped."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-timeout", type=float, required=True)
    parser.add_argument("--long-timeout", type=float, required=True)
    args = parser.parse_args()

    import logging

    import torch.distributed as dist
    from parity import tiny_config

    from megatron_vlm import distributed
    from megatron_vlm.config import ParallelConfig

    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    env = distributed.initialize(ParallelConfig(), tiny_config(), timeout_s=args.long_timeout)  # as the trainer
    distributed.heartbeat(1, "training step", args.step_timeout)
    dist.barrier()
    distributed.heartbeat(1, "checkpoint save", args.long_timeout)
    if env.rank == 1:
        time.sleep(distributed._backstop(args.step_timeout) + 2)  # a slow writer
    dist.barrier()
    print(f"rank {env.rank}: save survived", flush=True)
    for step in (2, 3):
        distributed.heartbeat(step, "training step", args.step_timeout)
        dist.barrier()
    print(f"rank {env.rank}: finished", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
