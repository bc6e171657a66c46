"""`make bench-data`: SFT data preparation of N synthetic multi-turn conversations, ours vs TRL's.

Generates N conversations (a system prompt, 3-4 user/assistant turns, Zipf-distributed words from
a 20k-word vocabulary, ~520 tokens each) into a JSONL file and trains a 32k byte-level BPE tokenizer
on a sample of them (ChatML template). Then, each in a fresh process (so peak memory is its own):

- ours: ``sft_data.load_chats`` as ``finetune run`` calls it (read, convert, mask every assistant
  turn, count, write the Arrow cache, mix) with ``data.num_proc`` 2 and 1, from a cold cache, then
  the same call again on the warm cache;
- trl: ``load_dataset("json")`` then ``SFTTrainer._prepare_dataset`` called directly (no model, no
  training) with ``assistant_only_loss=True``, ``max_length`` ours, and a ChatML template carrying
  ``{% generation %}`` around each reply and its ``<|im_end|>`` (what our masks train), with
  ``dataset_num_proc`` None (its default: one process) and 2.

Conversations/s count the input conversations over the wall time of the whole preparation; CPU
time (user + system, the workers' included) per conversation is what it costs whatever else runs
on the machine. Memory is sampled every 0.25 s: the main process's RSS and heap (anonymous
memory), and the whole process tree's PSS (forked workers share pages with their parent; PSS
counts each page once). The file pages of memory-mapped Arrow files count in RSS and PSS once touched
(page cache the kernel may drop), not in the heap. Before the runs, the first 200
conversations are prepared by both and their input_ids/labels compared (the masks are the same
rule: equal, or the difference is printed). One JSON line per run (with the machine's 1-minute
load average at its start and end: other processes share the CPUs), then a Markdown table.

    python -m finetune.data.bench_tokenize --n 200000 --workdir runs/bench-data    # make bench-data
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

CHATML_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MAX_LENGTH = 2048


# ---------------------------------------------------------------- data


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "er", "an", "in", "on"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(out)


def make_data(workdir: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """(conversations.jsonl, tokenizer dir), generated once per (n, seed) in workdir."""
    data, tok_dir = workdir / f"conversations-{n}-{seed}.jsonl", workdir / f"tokenizer-{seed}"
    rng = random.Random(seed)
    words = _words(rng, 20_000)
    cum = list(itertools.accumulate(1 / (r + 1) ** 1.1 for r in range(len(words))))  # Zipf(1.1)
    sentences = []
    for _ in range(50_000):
        picked = rng.choices(words, cum_weights=cum, k=rng.randint(4, 22))
        sentences.append(" ".join(picked).capitalize() + rng.choice(".....?!"))

    def text(k: int) -> str:
        return " ".join(rng.choice(sentences) for _ in range(k))

    if not data.is_file():
        tmp = data.with_suffix(".tmp")
        with tmp.open("w") as f:
            for _ in range(n):
                messages = [{"role": "system", "content": text(1)}]
                for _ in range(rng.choice((3, 4))):
                    messages.append({"role": "user", "content": text(rng.randint(1, 4))})
                    messages.append({"role": "assistant", "content": text(rng.randint(2, 10))})
                f.write(json.dumps({"messages": messages}) + "\n")
        tmp.rename(data)
    if not tok_dir.is_dir():
        from finetune.data.tokenizer import train_bpe_tokenizer

        tok = train_bpe_tokenizer(sentences, vocab_size=32_000, chat_template="chatml")
        tok.save_pretrained(tok_dir)
    return data, tok_dir


# ---------------------------------------------------------------- runs (each in its own process)


class PeakMemory:
    """Peaks, sampled in a thread: this process's RSS and anonymous memory (heap: RssAnon, what a
    data set held in Python costs; file pages of memory-mapped Arrow files are not in it), and the
    process tree's PSS (every page, shared ones split between their processes: forked workers share
    their parent's pages, which each one's RSS would count again)."""

    def __init__(self, every: float = 0.25) -> None:
        import psutil

        self.proc, self.every = psutil.Process(), every
        self.rss = self.anon = self.tree_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        import psutil

        self.rss = max(self.rss, self.proc.memory_info().rss)
        procs = [self.proc, *self.proc.children(recursive=True)]
        self.anon = max(self.anon, self._anon(self.proc.pid))
        pss = 0
        for p in procs:
            try:
                pss += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.tree_pss = max(self.tree_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        self.start, self.cpu0 = time.perf_counter(), os.times()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        t = os.times()
        self.cpu = sum(getattr(t, k) - getattr(self.cpu0, k) for k in ("user", "system", "children_user",
                                                                      "children_system"))
        self._stop.set()
        self._thread.join()
        self._sample()

    def result(self) -> dict:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu, "peak_rss_mb": self.rss / 2**20,
                "peak_heap_mb": self.anon / 2**20, "peak_tree_pss_mb": self.tree_pss / 2**20}


def _recipe(data: Path, tok_dir: Path, num_proc: int):
    from finetune.recipe.schema import recipe_from_dict

    return recipe_from_dict({
        "model": {"name": str(tok_dir)}, "tokenizer": {"max_length": MAX_LENGTH},
        "data": {"train": [{"path": str(data), "format": "messages"}], "num_proc": num_proc},
        "trainer": {"type": "sft"}, "run": {"output_dir": str(tok_dir.parent / "unused")},
    })


def run_ours(data: Path, tok_dir: Path, num_proc: int) -> dict:
    from transformers import AutoTokenizer

    from finetune.data.sft_data import load_chats
    from finetune.data.sources import BadRows

    tok = AutoTokenizer.from_pretrained(tok_dir)
    recipe = _recipe(data, tok_dir, num_proc)
    with PeakMemory() as mem:
        chats = load_chats(recipe, tok, BadRows())
    start = time.perf_counter()
    again = load_chats(recipe, tok, BadRows())
    warm = time.perf_counter() - start
    assert len(again.train) == len(chats.train)
    return {"system": "finetune", "num_proc": num_proc, "conversations": chats.stats.rows,
            "samples": chats.stats.samples, "tokens": chats.stats.tokens, "warm_seconds": warm, **mem.result()}


def trl_prepare(dataset, tok, num_proc: int | None):
    """SFTTrainer._prepare_dataset called on its own: a stand-in for the trainer's few attributes."""
    from types import SimpleNamespace

    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=os.devnull, assistant_only_loss=True, max_length=MAX_LENGTH, packing=False,
                     dataset_num_proc=num_proc, report_to=[], bf16=False)
    stub = SimpleNamespace(_tokenizer=tok, chat_template=CHATML_GENERATION, completion_only_loss=None)
    return SFTTrainer._prepare_dataset(stub, dataset, tok, args, False, None, "train")


def run_trl(data: Path, tok_dir: Path, num_proc: int | None) -> dict:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    with PeakMemory() as mem:
        start = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(data), split="train")
        loaded = time.perf_counter() - start
        out = trl_prepare(ds, tok, num_proc)
    tokens = sum(pyarrow_lengths(out))
    return {"system": "trl", "num_proc": num_proc or 1, "conversations": len(ds), "samples": len(out),
            "tokens": tokens, "load_seconds": loaded, **mem.result()}


def pyarrow_lengths(ds) -> list[int]:
    import pyarrow.compute as pc

    return [n for t in ds.select_columns(["input_ids"]).with_format("arrow").iter(batch_size=10_000)
            for n in pc.list_value_length(t.column("input_ids")).to_pylist()]


def compare(data: Path, tok_dir: Path, k: int = 200) -> str:
    """Our samples vs TRL's on the first k conversations: equal, or how many differ."""
    import datasets
    from transformers import AutoTokenizer

    from finetune.data.tokenizer import encode_chat

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rows = [json.loads(line) for _, line in zip(range(k), data.open(), strict=False)]
    trl = trl_prepare(datasets.Dataset.from_list(rows), tok, None)
    ours = [encode_chat(tok, r["messages"], "assistant", MAX_LENGTH) for r in rows]
    same = sum(o["input_ids"] == t["input_ids"] and o["labels"] == t["labels"] for o, t in zip(ours, trl, strict=True))
    return f"input_ids and labels equal on {same}/{k} conversations"


# ---------------------------------------------------------------- driver


def _versions() -> dict:
    import datasets
    import pyarrow
    import tokenizers
    import transformers
    import trl

    return {"python": sys.version.split()[0], "transformers": transformers.__version__, "trl": trl.__version__,
            "datasets": datasets.__version__, "pyarrow": pyarrow.__version__, "tokenizers": tokenizers.__version__,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def table(results: list[dict]) -> str:
    trl = next((r for r in results if r["system"] == "trl" and r["num_proc"] == 1), None)
    lines = ["| run | conversations/s | wall time | CPU per conversation | vs TRL 1 proc (wall) | peak RSS, main "
             "| peak heap, main | peak PSS, all processes | load avg (start-end) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rate = r["conversations"] / r["seconds"]
        vs = f"{rate / (trl['conversations'] / trl['seconds']):.2f}x" if trl else "-"
        extra = f" (warm cache: {r['warm_seconds']:.1f} s)" if "warm_seconds" in r else \
            f" (load_dataset {r['load_seconds']:.0f} s)" if "load_seconds" in r else ""
        lines.append(f"| {r['system']} num_proc={r['num_proc']} | {rate:,.0f} | {r['seconds']:,.0f} s{extra} "
                     f"| {1e3 * r['cpu_seconds'] / r['conversations']:.2f} ms | {vs} | {r['peak_rss_mb']:,.0f} MB "
                     f"| {r['peak_heap_mb']:,.0f} MB | {r['peak_tree_pss_mb']:,.0f} MB "
                     f"| {r['loadavg_start']:.1f}-{r['loadavg_end']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="conversations")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench-data"))
    p.add_argument("--runs", default="finetune:2,finetune:1,trl:1,trl:2", help="system:num_proc,...")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single run, in this process
    a = p.parse_args(argv)
    a.workdir.mkdir(parents=True, exist_ok=True)
    data, tok_dir = make_data(a.workdir, a.n)
    if a.one:
        system, num_proc = a.one.split(":")
        load = os.getloadavg()[0]
        result = run_ours(data, tok_dir, int(num_proc)) if system == "finetune" else \
            run_trl(data, tok_dir, int(num_proc) if int(num_proc) > 1 else None)
        print(json.dumps(result | {"loadavg_start": load, "loadavg_end": os.getloadavg()[0]}))
        return 0
    print(compare(data, tok_dir), flush=True)
    results = []
    for spec in a.runs.split(","):
        env = dict(os.environ, FINETUNE_CACHE=str(a.workdir / f"cache-{spec.replace(':', '-')}-{time.time_ns()}"),
                   HF_DATASETS_CACHE=str(a.workdir / f"hf-{spec.replace(':', '-')}-{time.time_ns()}"),
                   TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "finetune.data.bench_tokenize", "--n", str(a.n), "--workdir", str(a.workdir),
               "--one", spec]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(out.stdout.strip().splitlines()[-1]) | {"n": a.n, **_versions()}
        print(json.dumps(result), flush=True)
        results.append(result)
        if a.json_out:
            a.json_out.parent.mkdir(parents=True, exist_ok=True)
            with a.json_out.open("a") as f:
                f.write(json.dumps(result) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
