"""torchrun entry point for tests/test_fsdp.py: the `finetune` CLI with two test hooks.

    torchrun --nproc_per_node 2 -m tests.fsdp_worker STEP run recipe.yaml launch.strategy=fsdp ...

After optimizer step 1 every rank records what its parameters look like *during training*
(type, local and global shape) in <output_dir>/shards-rank<R>.json; after step STEP rank 1 alone
sends itself SIGTERM, as a scheduler's preemption would, so both ranks must agree to stop,
checkpoint and exit 75 at that step boundary.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def main() -> int:
    sigterm_step, args = int(sys.argv[1]), sys.argv[2:]
    from finetune.train import engine

    real_after_step = engine._after_step

    def after_step(recipe, task, model, optimizer, scheduler, accelerator, state, *rest):
        real_after_step(recipe, task, model, optimizer, scheduler, accelerator, state, *rest)
        rank = accelerator.process_index
        if state["step"] == 1:
            shapes = {name: {"type": type(p).__name__, "global": list(p.shape),
                             "local": list(p.to_local().shape) if hasattr(p, "to_local") else list(p.shape)}
                      for name, p in model.named_parameters()}
            (Path(recipe.run.output_dir) / f"shards-rank{rank}.json").write_text(json.dumps(shapes))
        if state["step"] == sigterm_step and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    engine._after_step = after_step
    from finetune.cli.main import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
