"""``python -m megatron_vlm.train --config FILE [section.key=value ...]``: Idefics2 pretraining."""

import sys

from megatron_vlm.training.loop import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn worker processes
    sys.exit(main())
