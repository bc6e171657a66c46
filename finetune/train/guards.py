"""What the loop does when a job dies in an ordinary way: preemption, non-finite numbers, OOM.

Exit codes (documented in the README, "When things go wrong"):
    75  preempted: SIGTERM/SIGINT arrived, a checkpoint was written at the step boundary;
        rerun the same command to resume (75 is EX_TEMPFAIL: "try again later")
    3   training stopped by a guard: too many non-finite steps, out of memory, disk full
"""

from __future__ import annotations

import signal
import threading

import torch

from finetune.errors import UserError

PREEMPTED_EXIT = 75


class TrainingStopped(UserError):
    """A guard stopped training; the message says what happened and what to change."""

    exit_code = 3


class Preempted(UserError):
    """A stop signal was honoured at a step boundary after writing a checkpoint."""

    exit_code = PREEMPTED_EXIT


class StopSignal:
    """SIGTERM/SIGINT -> finish the current optimizer step, checkpoint, exit 75.

    SLURM and Kubernetes send SIGTERM some time before killing a job. A second signal aborts at
    once (KeyboardInterrupt), for a user who really means it. In multi-process runs the flag is
    all-reduced every step so every rank stops at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._previous: dict = {}
        # Handlers can only be installed from the main thread (tests may run loops elsewhere).
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.close()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.requested = True
        self.name = signal.Signals(signum).name

    def should_stop(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class NumericGuard:
    """Skips optimizer steps whose gradient norm is not finite; stops after too many in a row.

    A NaN/inf loss makes NaN gradients, so the global gradient norm (already reduced across
    ranks) catches both, with one host sync per step. Under fp16 the loss scaler skips overflow
    steps itself (that is its normal working), so the guard stays out of its way.
    """

    def __init__(self, max_consecutive: int, fp16: bool) -> None:
        self.max_consecutive = max_consecutive
        self.active = not fp16
        self.consecutive = 0
        self.skipped = 0

    def step_is_finite(self, grad_norm: torch.Tensor | float | None) -> bool:
        if not self.active or grad_norm is None:
            return True
        # A tensor from torch's clipping; a float from DeepSpeed's engine (accelerate returns its norm).
        if bool(torch.isfinite(torch.as_tensor(grad_norm))):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        return False

    def check_limit(self, step: int, sample_ids: list[int], lr: float, precision: str) -> None:
        if self.consecutive <= self.max_consecutive:
            return
        raise TrainingStopped(
            f"step {step}: {self.consecutive} optimizer steps in a row had a non-finite loss or gradient "
            f"(last batch: training units {sample_ids[:16]}); try a lower optim.lr (now {lr:g}), "
            f"run.precision bf16/fp32 (now {precision}), or check those rows in `finetune data`")


def oom_message(step: int, micro_batch_size: int, longest: int, recipe) -> str:
    """What to change after a CUDA out-of-memory error, in one line."""
    hints = [f"run.micro_batch_size={max(1, micro_batch_size // 2)} run.grad_accum={recipe.run.grad_accum * 2}"]
    if not recipe.model.gradient_checkpointing:
        hints.append("model.gradient_checkpointing=true")
    hints.append(f"a smaller tokenizer.max_length (now {recipe.tokenizer.max_length})")
    if recipe.model.quantize is None:
        hints.append("QLoRA (adapter + model.quantize=4bit)")
    return (f"step {step}: out of GPU memory (micro-batch of {micro_batch_size} units, longest sequence "
            f"{longest} tokens); nothing was written; try " + ", or ".join(hints))
