"""`make gpu-check`: one script that proves, on a lent GPU machine, what no CPU test can (issue 15).

    python -m finetune.run.gpu_check        # a CUDA GPU: Qwen2.5-0.5B/1.5B, Llama-3.2-1B shapes, <= 9 min on an H200
    python -m finetune.run.gpu_check --cpu  # the same code on tiny shapes (part of `make test`)

Offline: random-init models of the public shapes saved to a temp dir with a tokenizer trained
here, synthetic conversations and prompts. Prints one table (check | setup | PASS/FAIL/SKIP |
numbers) and writes it into docs/gpu-check.md between the results markers (--out elsewhere);
exits 1 on any FAIL. Checks:

- attention: which kernel each setup's packed forward + backward ran (fp32-master full FT, bf16
  LoRA, QLoRA), read from the profiler; the math SDPA kernel (or, on CUDA, anything but flash) fails.
- packed vs padded: the same samples' loss and gradients in bf16 through collate_flat and collate_padded.
- memory: sft_lora / sft_qlora's settings trained for a few steps; torch.cuda.max_memory_allocated
  against the plan's estimate (within 15%) and the recipe's Hardware comment.
- compile: run.compile's layers over varying lengths: recompiles, graph breaks, tokens/s and loss vs eager.
- ppo: two PPO LoRA updates: ratio at the first minibatch ~ 1, finite non-zero grad norms, bf16 rollouts.
- sampling: n replies per prompt, one prefill per distinct prompt vs plain generate (gpu_check_sampling.py).
- pytest -m gpu, and `finetune bench --suite quick` (our SFT vs TRL's in the same run).
- deepspeed: a tiny zero2 and zero3 launch saves, resumes and matches the uninterrupted run (gpu_check_deepspeed.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.run import gpu_check_deepspeed, gpu_check_sampling

ROOT = Path(__file__).resolve().parents[2]
MARK_BEGIN, MARK_END = "<!-- gpu-check results -->", "<!-- /gpu-check results -->"
QWEN15 = dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
              intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
MEMORY_TOLERANCE = 0.15


@dataclass
class Row:
    check: str
    setup: str
    status: str  # PASS | FAIL | SKIP
    numbers: str


@dataclass
class Ctx:
    cpu: bool
    device: str
    work: Path
    shapes: dict  # role -> bench-style shape dict
    max_length: int
    steps: int


def make_ctx(cpu: bool, work: Path) -> Ctx:
    from finetune.train.bench import SHAPES

    if cpu:
        tiny = dict(SHAPES["tiny"])
        qwen = {**tiny, "model_type": "qwen2"}
        shapes = {"qwen0.5b": qwen, "llama1b": tiny, "qwen1.5b": qwen}
        return Ctx(True, "cpu", work, shapes, 64, 2)
    shapes = {"qwen0.5b": SHAPES["qwen0.5b"], "llama1b": SHAPES["llama1b"], "qwen1.5b": QWEN15}
    return Ctx(False, "cuda", work, shapes, 2048, 4)


# ----------------------------------------------------------------------------------------------
# Offline models and data


def words(n: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
                    for _ in range(n))


def model_dir(ctx: Ctx, role: str) -> Path:
    """A random-init model of the role's shape with a ChatML BPE tokenizer, saved like a Hub model (bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.data.tokenizer import train_bpe_tokenizer

    path = ctx.work / role
    if (path / "config.json").exists():
        return path
    cfg = dict(ctx.shapes[role])
    tok = train_bpe_tokenizer([words(200, s) for s in range(50)], vocab_size=min(cfg["vocab_size"], 2000),
                              chat_template="chatml")
    config = AutoConfig.for_model(cfg.pop("model_type"), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  bos_token_id=tok.bos_token_id, **cfg)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def write_data(ctx: Ctx) -> tuple[Path, Path]:
    scale = 1 if ctx.cpu else 12  # GPU: ~1k-token conversations, so packed rows of 2048 fill up
    convs, prompts = ctx.work / "chat.jsonl", ctx.work / "prompts.jsonl"
    with convs.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"messages": [{"role": "user", "content": words(4 * scale, i)},
                                             {"role": "assistant", "content": words(10 * scale, 1000 + i)}]}) + "\n")
    with prompts.open("w") as f:
        for i in range(16):
            f.write(json.dumps({"prompt": words(6, 2000 + i)}) + "\n")
    return convs, prompts


def sft_recipe(ctx: Ctx, role: str, convs: Path, **model) -> object:
    from finetune.recipe.schema import recipe_from_dict

    return recipe_from_dict({
        "model": {"name": str(model_dir(ctx, role)), **model},
        "tokenizer": {"chat_template": "chatml", "max_length": ctx.max_length},
        "data": {"train": [{"path": str(convs), "format": "messages"}], "cache": False},
        "trainer": {"type": "sft", "exact_match_samples": 0},
        "run": {"output_dir": str(ctx.work / "out"), "max_steps": ctx.steps, "micro_batch_size": 2,
                "precision": "bf16", "log_every": 1, "overwrite": True},
    })


def samples(ctx: Ctx, recipe, n: int) -> list[dict]:
    from finetune.trainers import sft

    return sft.prepare(recipe).train_units[:n]


def autocast(ctx: Ctx):
    return torch.autocast(ctx.device, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Checks


def kernel_of(names: set[str], cuda: bool) -> str:
    """The attention kernel among the profiled op names."""
    for key, label in (("flash_attention_for_cpu", "flash (cpu)"), ("_flash_attention", "flash"),
                       ("flash_attn", "flash"), ("varlen", "flash varlen"), ("_efficient_attention", "mem-efficient"),
                       ("_cudnn_attention", "cudnn"), ("_scaled_dot_product_attention_math", "math")):
        if any(key in n for n in names):
            return label
    return "math" if any("softmax" in n for n in names) else "none seen"


ATTN_SETUPS = {"full FT, fp32 master": {}, "LoRA, bf16 base": {"dtype": "bfloat16"},
               "QLoRA 4-bit": {"quantize": "4bit"}}


def load(recipe, device: str):
    from finetune.data.tokenizer_setup import load_tokenizer
    from finetune.models.loading import load_model
    from finetune.train.attention import enable_packed_attention

    tok = load_tokenizer(recipe, notes=[])
    model, _ = load_model(recipe, tok)
    if recipe.model.quantize is None:  # quantized weights are placed on the GPU as they load
        model.to(device)
    enable_packed_attention(model)
    return model.train()


def with_adapter(recipe, setup: str):
    if setup != "full FT, fp32 master":
        recipe.adapter = {"type": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"}
    return recipe


def check_attention(ctx: Ctx, convs: Path) -> list[Row]:
    from torch.profiler import ProfilerActivity, profile

    from finetune.train.collate import collate_flat
    from finetune.train.losses import token_ce_sum

    rows = []
    for setup, model_kw in ATTN_SETUPS.items():
        if "quantize" in model_kw and (skip := _quantize_problem(ctx, convs)):
            rows.append(Row("attention kernel", setup, "SKIP", skip))
            continue
        recipe = with_adapter(sft_recipe(ctx, "qwen0.5b", convs, **model_kw), setup)
        model = load(recipe, ctx.device)
        batch = collate_flat(samples(ctx, recipe, 4)).to(ctx.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if not ctx.cpu else [])
        with profile(activities=acts) as prof, autocast(ctx):
            token_ce_sum(model(**batch.model_inputs()).logits, batch.labels).backward()
        names = {e.name for e in prof.events()}
        kernel = kernel_of(names, not ctx.cpu)
        dtypes = _attention_dtypes(model, batch)
        ok = kernel != "math" and (ctx.cpu or "flash" in kernel)
        rows.append(Row("attention kernel", setup, "PASS" if ok else "FAIL", f"{kernel}; q/k/v {dtypes}"))
        del model
        _free()
    return rows


def _attention_dtypes(model, batch) -> str:
    """The q/k/v dtypes one attention call sees under autocast (fp32 here sends the kernel choice off flash)."""
    from transformers import AttentionInterface

    from finetune.train.attention import ATTENTION_NAME

    seen = []
    inner = getattr(AttentionInterface, "_global_mapping", {}).get(ATTENTION_NAME)
    if inner is None:  # another transformers layout: the kernel line still stands
        return "?"

    def spy(module, q, k, v, *a, **kw):
        seen.append("/".join(str(t.dtype).removeprefix("torch.") for t in (q, k, v)))
        return inner(module, q, k, v, *a, **kw)

    AttentionInterface._global_mapping[ATTENTION_NAME] = spy
    try:
        with torch.no_grad(), torch.autocast(batch.input_ids.device.type, dtype=torch.bfloat16):
            model(**batch.model_inputs())
    finally:
        AttentionInterface._global_mapping[ATTENTION_NAME] = inner
    return seen[0] if seen else "?"


@contextlib.contextmanager
def _quiet():
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _quantize_problem(ctx: Ctx, convs: Path) -> str | None:
    from finetune.errors import RecipeError
    from finetune.models.loading import check_quantization_supported

    try:
        check_quantization_supported(_qlora_recipe(ctx, convs))
    except RecipeError as e:
        return str(e)[:160]
    return None


def _qlora_recipe(ctx: Ctx, convs: Path):
    return with_adapter(sft_recipe(ctx, "qwen0.5b", convs, quantize="4bit"), "QLoRA 4-bit")


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_packed_vs_padded(ctx: Ctx, convs: Path) -> list[Row]:
    from functools import partial

    from finetune.train.collate import collate_flat, collate_padded
    from finetune.train.losses import token_ce_sum

    rows = []
    for setup in ("full FT, fp32 master", "LoRA, bf16 base"):
        recipe = with_adapter(sft_recipe(ctx, "llama1b", convs, **ATTN_SETUPS[setup]), setup)
        model = load(recipe, ctx.device)
        units = samples(ctx, recipe, 4)
        pad = model.config.pad_token_id or 0
        results = []
        for collate in (collate_flat, partial(collate_padded, pad_id=pad)):
            model.zero_grad(set_to_none=True)
            batch = collate(units).to(ctx.device)
            with autocast(ctx):
                loss = token_ce_sum(model(**batch.model_inputs()).logits, batch.labels)
            loss.backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            results.append((float(loss), grads))
        (l1, g1), (l2, g2) = results
        loss_rel = abs(l1 - l2) / abs(l2)
        cos = float(torch.nn.functional.cosine_similarity(g1, g2, dim=0))
        norm_rel = float((g1.norm() - g2.norm()).abs() / g2.norm())
        ok = loss_rel < 1e-2 and cos > 0.99 and norm_rel < 0.05
        rows.append(Row("packed vs padded (bf16)", setup, "PASS" if ok else "FAIL",
                        f"loss rel diff {loss_rel:.1e}; grad cosine {cos:.4f}, norm rel diff {norm_rel:.1e}"))
        del model
        _free()
    return rows


def check_memory(ctx: Ctx, convs: Path) -> list[Row]:
    """The recipes' memory settings (model, lengths, adapter, checkpointing, chunked CE) on their models' shapes."""
    from finetune.recipe.schema import load_recipe
    from finetune.train import memory
    from finetune.trainers import sft

    rows = []
    for name, role in (("sft_lora", "qwen0.5b"), ("sft_qlora", "qwen1.5b")):
        path = ROOT / "recipes" / f"{name}.yaml"
        recipe = load_recipe(path)
        claim = float(re.search(r"Hardware: one (\d+) GB GPU", path.read_text()).group(1))
        if recipe.model.quantize and (skip := _quantize_problem(ctx, convs)):
            rows.append(Row("peak memory", name, "SKIP", skip))
            continue
        recipe.model.name = str(model_dir(ctx, role))
        recipe.tokenizer.chat_template = "chatml"
        recipe.data.train = [{"path": str(convs), "format": "messages"}]
        recipe.data.eval = None
        recipe.data.cache = False
        recipe.run.output_dir, recipe.run.overwrite = str(ctx.work / f"out_{name}"), True
        recipe.run.max_steps, recipe.run.grad_accum = ctx.steps, 1
        recipe.run.eval_every = recipe.run.save_every = None
        if ctx.cpu:
            recipe.tokenizer.max_length, recipe.run.micro_batch_size = ctx.max_length, 2
        from transformers import AutoConfig

        est = memory.estimate(recipe, memory.Shape.from_config(AutoConfig.from_pretrained(recipe.model.name)))
        _free()
        base = torch.cuda.memory_allocated() if not ctx.cpu else 0  # anything an earlier check left behind
        with _quiet():
            sft.train(recipe)
        if ctx.cpu:
            rows.append(Row("peak memory", name, "SKIP", f"no CUDA (trained {ctx.steps} steps); estimate "
                            f"{est.total / 1e6:.1f} MB"))
            continue
        peak = torch.cuda.max_memory_allocated() - base
        rel = abs(est.total - peak) / peak
        ok = rel <= MEMORY_TOLERANCE and peak < claim * 1e9
        rows.append(Row("peak memory", name, "PASS" if ok else "FAIL",
                        f"max_memory_allocated {peak / 1e9:.2f} GB, estimate {est.total / 1e9:.2f} GB "
                        f"({100 * rel:.0f}% off), comment {claim:.0f} GB"))
        _free()
    return rows


def check_compile(ctx: Ctx) -> list[Row]:
    """run.compile's layers over three lengths: graph breaks, recompiles, tokens/s and loss vs eager."""
    from functools import partial

    from torch._dynamo.utils import counters

    from finetune.train import bench, fastpath
    from finetune.train.attention import enable_packed_attention
    from finetune.train.collate import collate_flat, collate_padded
    from finetune.train.losses import token_ce_sum

    shape = "tiny" if ctx.cpu else "qwen0.5b"
    lengths = (48, 64, 40) if ctx.cpu else (1024, 2048, 1536)
    # CPU: padded batches, since the packed path's CPU-only offset check (int(cu[-1])) breaks graphs by design.
    collate = partial(collate_padded, pad_id=0) if ctx.cpu else collate_flat
    batches = [collate(bench.synthetic_rows(4, n // 2, n, bench.SHAPES[shape]["vocab_size"], i)).to(ctx.device)
               for i, n in enumerate(lengths)]

    def run(compiled: bool) -> tuple[list[float], float]:
        model = enable_packed_attention(bench.random_model(shape, torch.float32, 0)).train()
        if compiled:
            fastpath.compile_layers(model, **({"backend": "eager"} if ctx.cpu else {}))
        losses, tokens, elapsed = [], 0, 0.0
        for rep in range(2):  # the second pass is timed: compilation happens in the first
            for b in batches:
                start = time.perf_counter()
                with autocast(ctx):
                    loss = token_ce_sum(model(**b.model_inputs()).logits, b.labels)
                loss.backward()
                if not ctx.cpu:
                    torch.cuda.synchronize()
                if rep:
                    elapsed += time.perf_counter() - start
                    tokens += b.input_ids.numel()
                else:
                    losses.append(float(loss))
        del model
        _free()
        return losses, tokens / elapsed

    torch._dynamo.reset()
    counters.clear()
    eager_loss, eager_tps = run(False)
    compiled_loss, tps = run(True)
    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    rel = max(abs(a - b) / abs(b) for a, b in zip(compiled_loss, eager_loss, strict=True))
    ok = breaks == 0 and graphs <= 2 and rel < 2e-2
    backend = "eager backend, padded (CPU)" if ctx.cpu else "inductor, packed"
    return [Row("compile", f"{shape}, {backend}, lengths {'/'.join(map(str, lengths))}", "PASS" if ok else "FAIL",
                f"graphs {graphs} (recompiles {max(graphs - 1, 0)}), graph breaks {breaks}, {tps:,.0f} tokens/s "
                f"vs eager {eager_tps:,.0f}, loss rel diff {rel:.1e}")]


def check_ppo(ctx: Ctx, prompts: Path) -> list[Row]:
    """Two PPO updates of a LoRA policy with the critic adapter, through the recipe path."""
    from finetune.recipe.schema import recipe_from_dict
    from finetune.trainers import ppo

    out = ctx.work / "ppo"
    recipe = recipe_from_dict({
        "model": {"name": str(model_dir(ctx, "qwen0.5b")), "dtype": "bfloat16"},
        "tokenizer": {"chat_template": "chatml", "max_length": 64},
        "data": {"train": [{"path": str(prompts), "format": "prompts"}], "cache": False},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
        "trainer": {"type": "ppo", "rewards": [{"type": "length", "min_length": 1, "max_length": 30},
                                                 {"type": "regex", "pattern": "(?s).*a.*", "weight": 0.5}],
                    "sampling": {"n": 1, "temperature": 1.0, "max_new_tokens": 8 if ctx.cpu else 32, "batch_size": 8},
                    "ppo": {"rollout_batch_size": 8, "epochs": 1, "minibatches": 2, "critic": "adapter",
                            "eval_prompts": 0, "missing_eos_penalty": None}},
        "optim": {"lr": 1e-4},
        "run": {"output_dir": str(out), "max_steps": 2, "micro_batch_size": 4, "precision": "bf16",
                "log_every": 1, "overwrite": True},
    })
    seen = {"ratio": [], "rollout": []}
    loss_fn, gen_fn = ppo.clipped_policy_loss, ppo.generate

    def policy_loss(logprobs, old, adv, mask, clip):
        result = loss_fn(logprobs, old, adv, mask, clip)
        seen["ratio"].append(float(result.ratio_sum / mask.sum()))
        return result

    def generate(policy, *a, **kw):
        dtype = next(p.dtype for n, p in policy.named_parameters() if "lora_" not in n)
        on = torch.is_autocast_enabled(ctx.device) and torch.get_autocast_dtype(ctx.device) == torch.bfloat16
        seen["rollout"].append(f"{str(dtype).removeprefix('torch.')} weights{', bf16 autocast' if on else ''}")
        return gen_fn(policy, *a, **kw)

    ppo.clipped_policy_loss, ppo.generate = policy_loss, generate
    try:
        with _quiet():
            ppo.train(recipe)
    finally:
        ppo.clipped_policy_loss, ppo.generate = loss_fn, gen_fn
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"grad_norm"' in x]
    norms = [r["grad_norm"] for r in records]
    first = seen["ratio"][0] if seen["ratio"] else float("nan")
    bf16 = bool(seen["rollout"]) and all("bfloat16" in r for r in seen["rollout"])
    ok = (len(norms) >= 2 and abs(first - 1) < 1e-3 and all(math.isfinite(n) and n > 0 for n in norms) and bf16)
    _free()
    return [Row("ppo (2 LoRA updates)", "critic adapter, bf16", "PASS" if ok else "FAIL",
                f"ratio at first minibatch {first:.5f}; grad norms {', '.join(f'{n:.3g}' for n in norms)}; "
                f"rollouts: {seen['rollout'][0] if seen['rollout'] else 'none seen'}")]


def check_pytest_gpu(ctx: Ctx) -> list[Row]:
    """GPU: the suite's gpu tests in their own process. CPU: one file in this process (no second torch import)."""
    args = ["-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_attention.py" if ctx.cpu else "tests"]
    if ctx.cpu:
        import io
        import os

        import pytest

        buf, cwd = io.StringIO(), os.getcwd()
        os.chdir(ROOT)
        try:
            with contextlib.redirect_stdout(buf):
                rc, output = int(pytest.main(args)), buf.getvalue()
        finally:
            os.chdir(cwd)
    else:
        proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        rc, output = proc.returncode, proc.stdout
    summary = (output.strip().splitlines() or ["no output"])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    if rc == 5 or not (counts.get("passed") or counts.get("failed") or counts.get("error") or counts.get("errors")):
        status = "SKIP"
    else:
        status = "PASS" if rc == 0 else "FAIL"
    if status == "FAIL":
        print(output[-4000:], file=sys.stderr)
    return [Row("pytest -m gpu", args[-1], status, summary.strip("= "))]


def check_bench(ctx: Ctx) -> list[Row]:
    """`finetune bench --suite quick` (GPU, its own process: a clean allocator); CPU: two tiny runs in process."""
    from finetune.train import bench

    if ctx.cpu:
        specs = [s for s in bench.suite("tiny", ["tiny"]) if s.name in ("fast path (no compile)", "TRL full padded")]
        with _quiet(), contextlib.redirect_stdout(sys.stderr):
            results = bench.run_all(specs, bench.Options(1, 1, 2, 16, 64))
        what, rc = "tiny (in process)", 0
    else:
        proc = subprocess.run([sys.executable, "-m", "finetune.train.bench", "--suite", "quick", "--steps", "8",
                               "--warmup", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        results = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{") and '"run"' in x]
        what, rc = "--suite quick", proc.returncode
        if rc:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    ours = [r for r in results if r.get("system") == "finetune" and "tokens_per_s" in r]
    trl = [r for r in results if r.get("system") == "trl" and "tokens_per_s" in r]
    errors = [f"{r['run']}: {r['error']}" for r in results if "error" in r]
    if rc or errors or not ours:
        return [Row("bench", what, "FAIL", "; ".join(errors) or f"exit {rc}")]
    numbers = "; ".join(f"{'TRL' if r['system'] == 'trl' else 'ours'} {r['adapter']} {r['run']}: "
                        f"{r['tokens_per_s']:,.0f} tok/s" + (f", {r['peak_gib']} GiB" if r.get("peak_gib") else "")
                        for r in ours + trl)
    return [Row("bench", what, "PASS" if trl else "SKIP", numbers if trl else f"TRL not importable; {numbers}")]


# ----------------------------------------------------------------------------------------------
# Driver


def run_checks(ctx: Ctx, only: set[str] | None = None, progress=None) -> list[Row]:
    """Every check in turn; progress(rows) after each, so a run stopped by a time limit keeps its lines."""
    convs, prompts = write_data(ctx)
    checks = {"attention": lambda: check_attention(ctx, convs), "packed": lambda: check_packed_vs_padded(ctx, convs),
              "memory": lambda: check_memory(ctx, convs), "compile": lambda: check_compile(ctx),
              "ppo": lambda: check_ppo(ctx, prompts),
              "sampling": lambda: [Row(*r) for r in gpu_check_sampling.check(ctx, model_dir)],
              "pytest": lambda: check_pytest_gpu(ctx),
              "bench": lambda: check_bench(ctx), "deepspeed": lambda: [Row(*r) for r in gpu_check_deepspeed.check(
                  ctx, convs, model_dir, asked="deepspeed" in (only or ()))]}
    rows: list[Row] = []
    for name, check in checks.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            new = check()
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others' lines
            traceback.print_exc()
            new = [Row(name, "", "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")]
        for row in new:
            row.numbers += f" [{time.perf_counter() - start:.0f} s]"
            print(f"{row.status:4}  {row.check} | {row.setup} | {row.numbers}", flush=True)
        rows += new
        if progress is not None:
            progress(rows)
    return rows


def header(ctx: Ctx) -> str:
    import transformers

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {name}, mode {'--cpu' if ctx.cpu else 'GPU'}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def table(rows: list[Row]) -> str:
    lines = ["| check | setup | result | numbers |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.check} | {r.setup} | {r.status} | {r.numbers.replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    """Replaces the results section of the doc (or writes a fresh file)."""
    block = f"{MARK_BEGIN}\n{text}\n{MARK_END}"
    old = path.read_text() if path.exists() else ""
    if MARK_BEGIN in old and MARK_END in old:
        new = old[:old.index(MARK_BEGIN)] + block + old[old.index(MARK_END) + len(MARK_END):]
    else:
        new = (old + "\n" if old else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.run.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (what `make test` runs)")
    p.add_argument("--out", default=None, help="markdown file to write the table into "
                   "(default docs/gpu-check.md; with --cpu runs/gpu-check-cpu.md)")
    p.add_argument("--only", default=None,
                   help="comma-separated: attention,packed,memory,compile,ppo,sampling,pytest,bench,deepspeed")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu for the CPU smoke mode", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    out = Path(args.out or ("runs/gpu-check-cpu.md" if args.cpu else ROOT / "docs/gpu-check.md"))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = make_ctx(args.cpu, Path(tmp))
        only = set(args.only.split(",")) if args.only else None
        rows = run_checks(ctx, only, lambda rows: write_results(out, f"{header(ctx)} (partial)\n\n{table(rows)}"))
        text = f"{header(ctx)}\n\n{table(rows)}"
    print("\n" + text)
    write_results(out, text)
    failed = [r for r in rows if r.status == "FAIL"]
    print(f"\n{len(failed)} FAIL, {sum(r.status == 'PASS' for r in rows)} PASS, "
          f"{sum(r.status == 'SKIP' for r in rows)} SKIP -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
