"""`finetune bench`: tokens/s, step time, peak memory, MFU and loss of our SFT path and TRL's, side by side.

Random-init models built from a config; synthetic rows, lengths uniform in [min_length, max_length],
Zipf token ids (the loss falls as text's does). Our runs go through the real engine step
(``engine._Loop``: collate, count, forward/loss, backward, clip, guard, AdamW, schedule) with a recipe
from ``recipe_from_dict``, ``model.load_model`` and ``finetune.train.fastpath``'s switches; TRL's
SFTTrainer gets the same shape, rows, batch and learning rate. ``warmup`` untimed steps (compilation
included), then ``steps`` timed ones, synchronized only at the two boundaries. tokens/s counts real
tokens; MFU counts their useful FLOPs (6N per token, 4N for a frozen base under LoRA, plus causal
attention per sample) over the GPU's dense bf16 peak. One JSON line per run, then a table.

    python -m finetune.train.bench --suite issue --shapes qwen0.5b,llama1b --check   # (finetune bench ...)
    python -m finetune.train.bench --suite tiny --no-trl                              # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# Architectures of the issue (random init). qwen7b is for memory: full fine-tuning of it does not
# fit one 80 GB GPU with fp32 master weights (16 bytes/param before activations).
SHAPES: dict[str, dict] = {
    "qwen0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                     max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "llama1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                    max_position_embeddings=131072, rope_theta=500_000.0, rms_norm_eps=1e-5, head_dim=64),
    "qwen7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                   num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                   max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
    "tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=512, tie_word_embeddings=True,
                 max_position_embeddings=256),  # CPU smoke tests of the harness
}

LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run. system: finetune | trl. policy: bf16 (bf16 weights and optimizer state,
    bf16 autocast: what TRL does with a bf16 model) | amp (fp32 master weights, bf16 autocast) |
    fp32 (CPU smoke runs). layout: padded | padfree (one flat row per micro-batch) | packed (rows of
    max_length bin-packed, then flat)."""

    name: str
    system: str = "finetune"
    shape: str = "qwen0.5b"
    adapter: bool = False  # LoRA r16 all-linear
    policy: str = "bf16"
    layout: str = "padfree"
    # our fast-path switches (finetune.train.fastpath); all on = the fast path
    chunked_ce: bool = True
    compile: bool = True
    fused_adamw: bool = True
    sync_free: bool = True
    gradient_checkpointing: bool = False


@dataclass
class Options:
    steps: int = 20
    warmup: int = 5
    batch_size: int = 8
    min_length: int = 128
    max_length: int = 2048
    seed: int = 0
    peak_tflops: float | None = None
    profile_dir: str | None = None  # torch.profiler op tables of PROFILE_STEPS extra steps per run


PROFILE_STEPS = 3


def _ablation(shape: str) -> list[RunSpec]:
    """Our path with each switch added in turn (cumulative), from the plain padded path."""
    spec = RunSpec("plain padded", shape=shape, layout="padded", chunked_ce=False, compile=False,
                   fused_adamw=False, sync_free=False)
    runs = [spec]
    for label, change in [("+ padding-free varlen (today's default)", {"layout": "padfree"}),
                          ("+ fused AdamW", {"fused_adamw": True}), ("+ sync-free batches", {"sync_free": True}),
                          ("+ fused linear CE", {"chunked_ce": True}),
                          ("+ compiled layers (fast path)", {"compile": True})]:
        runs.append(spec := dataclasses.replace(spec, name=label, **change))
    return runs


def suite(name: str, shapes: list[str]) -> list[RunSpec]:
    """issue: everything the issue asks for (the ablation on the first shape); quick: TRL vs the
    fast path, full and LoRA; ablation; memory (LoRA, for a 7B shape); tiny (CPU smoke runs)."""
    runs: list[RunSpec] = []
    for i, shape in enumerate(shapes):
        trl = [RunSpec("TRL full padded", "trl", shape, layout="padded"),
               RunSpec("TRL full packed", "trl", shape, layout="packed"),
               RunSpec("TRL LoRA padded", "trl", shape, adapter=True, layout="padded")]
        fast = RunSpec("fast path", shape=shape)
        amp = dataclasses.replace(fast, name="fast path, fp32 master", policy="amp")
        lora_fast = RunSpec("LoRA fast path", shape=shape, adapter=True)
        lora_today = dataclasses.replace(lora_fast, name="LoRA today's default", chunked_ce=False, compile=False,
                                         fused_adamw=False, sync_free=False)
        tiny = dict(shape=shape, policy="fp32", compile=False)
        runs += {
            "issue": trl + (_ablation(shape) + [dataclasses.replace(fast, name="fast path, packed rows",
                                                                    layout="packed")]
                            if i == 0 else [_ablation(shape)[1], fast]) + [amp, lora_today, lora_fast],
            "quick": [trl[0], fast, amp, trl[2], lora_fast],
            "ablation": _ablation(shape),
            "memory": [trl[2], lora_fast, dataclasses.replace(lora_fast, name="LoRA fast path + checkpointing",
                                                              gradient_checkpointing=True)],
            "tiny": [RunSpec("plain padded", layout="padded", chunked_ce=False, fused_adamw=False, sync_free=False,
                             **tiny),
                     RunSpec("fast path (no compile)", **tiny),
                     RunSpec("LoRA fast path (no compile)", adapter=True, **tiny),
                     RunSpec("TRL full padded", "trl", shape, policy="fp32", layout="padded")],
        }[name]
    return runs


def synthetic_rows(n: int, min_length: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    """n samples, lengths uniform in [min_length, max_length], Zipf(1.1) token ids, all trained."""
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g).tolist()
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    ids = torch.multinomial(weights, sum(lengths), replacement=True, generator=g).tolist()
    ends = list(itertools.accumulate(lengths))
    return [{"input_ids": ids[end - n:end], "labels": ids[end - n:end]} for n, end in zip(lengths, ends, strict=True)]


class TokenCounter(list):
    """(real tokens, sum of squared sample lengths) of each collated batch, in collation order."""

    def add(self, seq_lens: list[int]) -> None:
        self.append((sum(seq_lens), sum(s * s for s in seq_lens)))

    def record(self, batch):
        self.add(batch.seq_lens)
        return batch

    def window(self, start: int, stop: int | None = None) -> tuple[int, int]:
        return sum(t for t, _ in self[start:stop]), sum(q for _, q in self[start:stop])


def model_flops(shape: dict, adapter: bool, tokens: int, sum_sq: int, lora_r: int = 16) -> float:
    """Useful training FLOPs: matmuls 6N per token (4N for a frozen base: no weight gradients),
    LoRA 6 per adapter parameter per token, causal attention 6 * layers * heads * head_dim * s^2
    per sample of length s (forward 2 s^2 h d for QK^T and PV at half, backward twice that)."""
    d, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    kv, inter, vocab = shape["num_key_value_heads"], shape["intermediate_size"], shape["vocab_size"]
    hd = shape.get("head_dim") or d // heads
    linears = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, inter), (d, inter), (inter, d)]
    n_matmul = layers * sum(i * o for i, o in linears) + vocab * d
    attention = 6.0 * layers * heads * hd * sum_sq
    n_lora = layers * lora_r * sum(i + o for i, o in linears) if adapter else 0
    return (4.0 if adapter else 6.0) * n_matmul * tokens + 6.0 * n_lora * tokens + attention


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Dense bf16 tensor-core peak (datasheet, no sparsity)."""
    if override_tflops:
        return override_tflops * 1e12
    table = (("H100 PCIE", 756), ("H100", 989), ("H200", 989), ("H800", 989), ("B200", 2250), ("A100", 312),
             ("L40S", 362), ("A10G", 70), ("4090", 165))
    return next((t * 1e12 for key, t in table if key in device_name.upper()), None)


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _sync(reset_peak: bool = False) -> None:
    """Waits for the GPU (the only syncs the harness adds: at the timing boundaries)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()


def _cleanup() -> None:
    """Between runs: accelerate's singletons, compiled graphs and cached GPU blocks go."""
    import torch

    from finetune.train.engine import release_accelerator

    release_accelerator()
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


class _Profile:
    """torch.profiler over the extra steps after the timed ones; the op table goes to DIR/<run>.txt."""

    def __init__(self, directory: str | None, name: str) -> None:
        self.path = directory and Path(directory) / (re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_") + ".txt")
        self.prof, self.key = None, "self_cpu_time_total"

    def start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.path:
            cuda = torch.cuda.is_available()
            self.key = "self_cuda_time_total" if cuda else self.key
            self.prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
            self.prof.start()

    def stop(self) -> None:
        if self.prof is not None:
            _sync()
            self.prof.stop()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(self.prof.key_averages().table(sort_by=self.key, row_limit=40))
            self.prof = None


def _result(spec: RunSpec, opts: Options, tokens: int, sum_sq: int, elapsed: float, loss: float | None,
            extra: dict | None = None) -> dict:
    import torch
    flops = model_flops(SHAPES[spec.shape], spec.adapter, tokens, sum_sq)
    peak = peak_flops(device_name(), opts.peak_tflops)
    mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    switches = {k: getattr(spec, k) if spec.system == "finetune" else None  # ours only
                for k in ("chunked_ce", "compile", "fused_adamw", "sync_free")}
    return {
        "run": spec.name, "system": spec.system, "shape": spec.shape, "adapter": "lora" if spec.adapter else "full",
        "policy": spec.policy, "layout": spec.layout, **switches, "gradient_checkpointing": spec.gradient_checkpointing,
        "tokens_per_s": round(tokens / elapsed, 1), "step_s": round(elapsed / opts.steps, 4),
        "peak_gib": None if mem is None else round(mem, 2),
        "mfu": None if peak is None else round(flops / elapsed / peak, 4),
        "tflops": round(flops / elapsed / 1e12, 1), "loss": None if loss is None else round(loss, 4),
        "tokens": tokens, "steps": opts.steps, "warmup": opts.warmup, "batch_size": opts.batch_size,
        **(extra or {}),
    }


def bench_recipe(spec: RunSpec, opts: Options, output_dir: str) -> object:
    import torch

    from finetune.recipe.schema import recipe_from_dict

    cuda = torch.cuda.is_available()
    total = opts.warmup + opts.steps
    return recipe_from_dict({
        "model": {"init_config": dict(SHAPES[spec.shape]),
                  "dtype": "bfloat16" if spec.policy == "bf16" else "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": spec.gradient_checkpointing},
        "tokenizer": {"max_length": opts.max_length},
        "data": {"train": [{"path": "synthetic", "format": "text"}], "packing": spec.layout == "packed",
                 "padding_free": spec.layout != "padded"},
        "adapter": dict(LORA) if spec.adapter else None,
        "trainer": {"type": "sft", "exact_match_samples": 0},
        "optim": {"lr": 1e-4 if spec.adapter else 2e-5, "scheduler": "constant", "max_grad_norm": 1.0},
        "run": {"output_dir": output_dir, "max_steps": total, "micro_batch_size": opts.batch_size,
                "precision": "bf16" if cuda and spec.policy != "fp32" else "fp32", "seed": opts.seed,
                "log_every": 10**9},
    }, source=f"<bench {spec.name}>")


def _units_and_collate(spec: RunSpec, rows: list[dict], max_length: int):
    """Training units (samples, or bin-packed rows of samples) and the collator for them."""
    from finetune.train.collate import collate_flat, collate_padded, pack_bins

    if spec.layout == "packed":
        bins = pack_bins([len(r["input_ids"]) for r in rows], max_length)
        return [[rows[i] for i in b] for b in bins], lambda units: collate_flat([s for row in units for s in row])
    return rows, collate_flat if spec.layout == "padfree" else partial(collate_padded, pad_id=0)


def _optimizer(recipe, model, fused: bool):
    import torch

    from finetune.train.engine import build_optimizer

    optimizer = build_optimizer(recipe, model)
    if fused or not torch.cuda.is_available():
        return optimizer
    # What `finetune run` builds today: the model is still on the CPU when build_optimizer runs,
    # so it picks the foreach (unfused) AdamW.
    o = recipe.optim
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, foreach=True)


def run_finetune(spec: RunSpec, opts: Options, rows: list[dict]) -> dict:
    import torch
    from accelerate import Accelerator

    from finetune.models.loading import load_model
    from finetune.train import engine, fastpath
    from finetune.train.attention import enable_packed_attention
    from finetune.train.metrics import MetricsLogger

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as out:
        recipe = bench_recipe(spec, opts, out)
        torch.manual_seed(opts.seed)
        # Built straight on the GPU (random init of a 7B shape on the CPU takes minutes).
        with torch.device("cuda" if cuda else "cpu"):
            model, _ = load_model(recipe)
        if spec.layout != "padded":
            enable_packed_attention(model)
        fast = fastpath.setup(recipe, model, chunked_ce=spec.chunked_ce, compile=spec.compile,
                              sync_free=spec.sync_free)
        units, collate = _units_and_collate(spec, rows, opts.max_length)
        counter, collate = TokenCounter(), fast.wrap_collate(collate)
        task = engine.SupervisedTask(model=model, tokenizer=None, train_units=units, loss_sum=fast.loss_sum,
                                     collate=lambda u: counter.record(collate(u)), count_tokens=fast.count_tokens)
        accelerator = Accelerator(cpu=not cuda, mixed_precision=engine.resolve_precision(recipe))
        total = opts.warmup + opts.steps
        optimizer = _optimizer(recipe, model, spec.fused_adamw)
        scheduler = engine.build_scheduler(recipe, optimizer, total)
        model, optimizer = accelerator.prepare(model, optimizer)
        stream = engine.MicroBatchStream(len(task.train_units), opts.batch_size, 1, 0, opts.seed, True)
        logger = MetricsLogger(Path(out), total + 1, 0, accelerator)
        window = engine._Window(accelerator.device)
        # The loop never reaches its "last step" (which logs and evaluates).
        loop = engine._Loop(recipe, task, model, optimizer, scheduler, accelerator, stream, logger, window, 10**9)
        state = {"step": 0, "micro_index": 0, "tokens_seen": 0, "num_processes": 1, "skipped_steps": 0}
        model.train()
        _sync(reset_peak=True)
        try:
            for _ in range(opts.warmup):
                loop.step(state)
            _sync()
            first, start = len(counter), time.perf_counter()
            for i in range(opts.steps):
                if i == opts.steps - 1:
                    window.reset()  # the loss of the last step alone
                loop.step(state)
            _sync()
            elapsed = time.perf_counter() - start
            loss = float(window.loss) / max(window.trained, 1)
            tokens, sum_sq = counter.window(first)
            result = _result(spec, opts, tokens, sum_sq, elapsed, loss, {"notes": fast.notes})
            if opts.profile_dir:
                prof = _Profile(opts.profile_dir, f"{spec.shape}-ours-{'lora-' * spec.adapter}{spec.name}")
                prof.start()
                for _ in range(PROFILE_STEPS):
                    loop.step(state)
                prof.stop()
            return result
        finally:
            logger.close()
            del loop, model, optimizer, task, fast, window
            _cleanup()


def trl_available() -> str | None:
    """TRL's version when trl and datasets import, else None."""
    try:
        import datasets  # noqa: F401
        import trl
    except Exception:  # noqa: BLE001 - any import failure means: not benchmarkable here
        return None
    return trl.__version__


def _trl_tokenizer():
    """A tokenizer that only knows pad/eos/unk: the rows are already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def run_trl(spec: RunSpec, opts: Options, rows: list[dict]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    model = random_model(spec.shape, torch.bfloat16 if spec.policy == "bf16" else torch.float32, opts.seed)
    peft_config = None
    if spec.adapter:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                 lora_dropout=0.0, task_type="CAUSAL_LM")
    counter, timing, total = TokenCounter(), {}, opts.warmup + opts.steps
    prof = _Profile(opts.profile_dir, f"{spec.shape}-trl-{'lora-' * spec.adapter}{spec.name}")

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == opts.warmup:
                _sync()
                timing["start"] = time.perf_counter()
            if state.global_step == total:
                prof.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == total:
                _sync()
                timing["elapsed"] = time.perf_counter() - timing["start"]
            if state.global_step == total + PROFILE_STEPS:
                prof.stop()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.global_step == total:
                timing["loss"] = logs["loss"]

    with tempfile.TemporaryDirectory(prefix="finetune-bench-trl-") as out:
        # TRL's own defaults otherwise (fused AdamW, sdpa); gradient checkpointing (TRL's default: on) as ours.
        args = SFTConfig(
            output_dir=out, per_device_train_batch_size=opts.batch_size, max_length=opts.max_length,
            packing=spec.layout == "packed", padding_free=spec.layout == "padfree",
            bf16=cuda and spec.policy != "fp32", gradient_checkpointing=spec.gradient_checkpointing,
            max_steps=total + PROFILE_STEPS * bool(opts.profile_dir), logging_steps=1, save_strategy="no",
            report_to=[], disable_tqdm=True, learning_rate=1e-4 if spec.adapter else 2e-5, lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=1.0, seed=opts.seed, dataloader_num_workers=0)
        dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]})
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=_trl_tokenizer(),
                             peft_config=peft_config, callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)
        inner = trainer.data_collator

        def counted(examples):
            batch = inner(examples)
            counter.add(_trl_seq_lens(batch))
            return batch

        trainer.data_collator = counted
        _sync(reset_peak=True)
        try:
            trainer.train()
            tokens, sum_sq = counter.window(opts.warmup, total)
            return _result(spec, opts, tokens, sum_sq, timing["elapsed"], timing.get("loss"),
                           {"notes": [f"trl {trl_available()}, SFTTrainer, attn sdpa, loss = last logged step"]})
        finally:
            del trainer, model
            _cleanup()


def _trl_seq_lens(batch) -> list[int]:
    """Real sample lengths of a TRL batch (on the CPU): attention-mask rows, or flat position ids."""
    if batch.get("attention_mask") is not None:
        return [int(n) for n in batch["attention_mask"].sum(-1).tolist()]
    pos = batch["position_ids"].reshape(-1)
    starts = (pos == 0).nonzero().squeeze(1).tolist() + [pos.numel()]
    return [b - a for a, b in zip(starts, starts[1:], strict=False) if b > a]


def random_model(shape: str, dtype, seed: int):
    """A random-init transformers model of the shape, sdpa attention, built on the GPU when there is one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def exactness(shape: str, opts: Options, compile: bool = False, policy: str | None = None) -> dict:
    """fastpath.compare_with_plain on one batch of the benchmark's rows (bf16 on a GPU, fp32 on the CPU)."""
    import torch

    from finetune.train import fastpath
    rows = synthetic_rows(opts.batch_size, opts.min_length, opts.max_length, SHAPES[shape]["vocab_size"], 1)
    policy = policy or ("bf16" if torch.cuda.is_available() else "fp32")
    result = fastpath.compare_with_plain(random_model(shape, torch.float32, opts.seed), rows, policy, compile)
    _cleanup()
    return {"check": "exactness", "shape": shape, **result}


def versions() -> dict:
    import platform

    import peft
    import torch
    import transformers

    return {"device": device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl_available(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d", time.gmtime())}


def run_spec(spec: RunSpec, opts: Options, rows: list[dict]) -> dict:
    import traceback

    import torch

    what = {"run": spec.name, "system": spec.system, "shape": spec.shape}
    if spec.system == "trl" and trl_available() is None:
        return {**what, "skipped": "trl/datasets not importable"}
    try:
        return (run_trl if spec.system == "trl" else run_finetune)(spec, opts, rows)
    except Exception as e:  # noqa: BLE001 - one broken run must not lose the others' numbers
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        None if oom else traceback.print_exc()
        _cleanup()
        return {**what, "error": "out of GPU memory" if oom else f"{type(e).__name__}: {str(e)[:200]}"}


def run_all(specs: list[RunSpec], opts: Options, json_out: Path | None = None, printer=print) -> list[dict]:
    results, rows_by_shape = [], {}
    header = versions()
    printer(json.dumps({"versions": header, "options": dataclasses.asdict(opts)}))
    for spec in specs:
        if spec.shape not in rows_by_shape:
            n = opts.batch_size * (opts.warmup + opts.steps) * 2
            rows_by_shape[spec.shape] = synthetic_rows(n, opts.min_length, opts.max_length,
                                                       SHAPES[spec.shape]["vocab_size"], opts.seed)
        results.append(result := run_spec(spec, opts, rows_by_shape[spec.shape]))
        printer(json.dumps(result))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            with json_out.open("a", encoding="utf-8") as f:
                f.write(json.dumps({**result, **header}) + "\n")
    return results


def table(results: list[dict]) -> str:
    """Markdown table; 'x TRL' is tokens/s over TRL's padded run of the same shape and adapter."""
    base = {(r["shape"], r.get("adapter")): r["tokens_per_s"] for r in results
            if r.get("system") == "trl" and r.get("layout") == "padded" and "tokens_per_s" in r}
    lines = ["| shape | run | policy | tokens/s | x TRL | step s | peak GiB | MFU | loss |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['shape']} | {r['system']}: {r['run']} | | {r.get('error') or r.get('skipped')} "
                         "| | | | | |")
            continue
        ref = base.get((r["shape"], r["adapter"]))
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else ""
        mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        name = f"{'TRL' if r['system'] == 'trl' else 'ours'} {r['adapter']}: {r['run']}"
        lines.append(f"| {r['shape']} | {name} | {r['policy']} | {r['tokens_per_s']:,.0f} | {ratio} | "
                     f"{r['step_s']:.3f} | {peak} | {mfu} | {r['loss']} |")
    return "\n".join(lines)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="quick", choices=["issue", "quick", "ablation", "memory", "tiny"],
                   help="which runs (default quick: TRL vs our fast path, full and LoRA)")
    p.add_argument("--shapes", default=None, help=f"comma-separated: {', '.join(SHAPES)} (default qwen0.5b)")
    p.add_argument("--only", default=None, help="comma-separated run names (substrings) to keep")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's runs")
    for flag, default, what in (("--steps", 20, "timed optimizer steps"),
                                ("--warmup", 5, "untimed steps first, compilation included"),
                                ("--batch-size", 8, "samples per step"), ("--min-length", 128, "shortest row"),
                                ("--max-length", 2048, "longest row"), ("--seed", 0, "data and init seed")):
        p.add_argument(flag, type=int, default=default, help=f"{what} (default {default})")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--check", action="store_true", help="first compare the fast path's loss/grads with the plain's")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help=f"after the timed steps, profile {PROFILE_STEPS} more and write each run's op table to DIR")
    p.add_argument("--json-out", default=None, help="append one JSON line per run (with versions) to this file")


def cmd_bench(args) -> int:
    shapes = (args.shapes or ("tiny" if args.suite == "tiny" else "qwen0.5b")).split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        from finetune.errors import UserError

        raise UserError(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    opts = Options(args.steps, args.warmup, args.batch_size, args.min_length, args.max_length, args.seed,
                   args.peak_tflops, args.profile)
    specs = suite(args.suite, shapes)
    if args.no_trl:
        specs = [s for s in specs if s.system != "trl"]
    if args.only:
        keep = [k.strip().lower() for k in args.only.split(",")]
        specs = [s for s in specs if any(k in f"{s.system} {s.name}".lower() for k in keep)]
    if args.check:
        for shape in shapes:
            print(json.dumps(exactness(shape, opts)), flush=True)
    results = run_all(specs, opts, Path(args.json_out) if args.json_out else None,
                      printer=partial(print, flush=True))
    print("\n" + table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune bench", description=__doc__.split("\n")[0])
    add_bench_arguments(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
