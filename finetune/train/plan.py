"""The run plan printed at start and by `finetune run --dry-run`."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.recipe.schema import Recipe
from finetune.train import memory


@dataclass
class Plan:
    trainer: str
    model: str
    total_params: int
    trainable_params: int
    train_units: int
    train_tokens: int
    eval_units: int = 0
    unit: str = "sequences"
    notes: list[str] = field(default_factory=list)

    def lines(self, recipe: Recipe, num_processes: int = 1) -> list[str]:
        run = recipe.run
        seqs = run.micro_batch_size * run.grad_accum * num_processes
        mean_len = self.train_tokens / max(self.train_units, 1)
        per_epoch = self.train_units // (run.micro_batch_size * num_processes)
        steps = run.max_steps or max(1, int(run.epochs * per_epoch / run.grad_accum + 0.999999))
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        out = [
            f"trainer    {self.trainer}",
            f"model      {self.model}",
            f"params     {self.total_params:,} total, {self.trainable_params:,} trainable ({pct:.2f}%)",
            f"data       {self.train_units:,} train {self.unit} ({self.train_tokens:,} tokens), "
            f"{self.eval_units:,} eval",
            f"batch      {seqs} {self.unit}/step = {run.micro_batch_size} micro x {run.grad_accum} accum x "
            f"{num_processes} proc, ~{seqs * mean_len:,.0f} tokens/step",
            f"steps      {steps} optimizer steps, lr {recipe.optim.lr:g} ({recipe.optim.scheduler})",
            f"output     {run.output_dir}",
        ]
        out += memory.plan_lines(recipe, num_processes, self.total_params)
        out += [f"note       {n}" for n in self.notes]
        return out
