"""final/README.md: a Hugging Face model card for every finished run (full weights or adapter).

The YAML header is the Hub's model-card metadata (base_model, library_name, datasets, tags,
license, pipeline_tag), so `huggingface_hub.ModelCard.load` reads it and a pushed model is linked
to its base; the body holds what a reader needs to reproduce and judge it: the resolved recipe,
the final metrics and the evaluation table from metrics.jsonl. peft writes an empty template for
adapters; it is replaced.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from finetune import __version__
from finetune.recipe.checks import looks_like_hub_id
from finetune.recipe.schema import Recipe, dump_recipe

_PIPELINE_TAG = {"reward": "text-classification"}


def write_model_card(recipe: Recipe, final: Path) -> Path:
    out = Path(recipe.run.output_dir)
    records = _read_metrics(out / "metrics.jsonl")
    meta = _metadata(recipe, final)
    body = [f"# {out.name}", "", _summary(recipe), "", "## Results", "", *_results(records), "",
            "## Recipe", "", "```yaml", dump_recipe(recipe).rstrip(), "```", "", "## Framework versions", "",
            *_versions(), ""]
    card = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body)
    path = final / "README.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(card, encoding="utf-8")
    tmp.replace(path)
    return path


def _metadata(recipe: Recipe, final: Path) -> dict:
    meta: dict = {}
    base = recipe.model.name
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if (final / "adapter_config.json").is_file() else "transformers"
    datasets = [s.path for s in recipe.data.train if looks_like_hub_id(s.path) and not Path(s.path).exists()]
    if datasets:
        meta["datasets"] = datasets
    license_ = _base_license(base) if base else None
    if license_:
        meta["license"] = license_
    tags = ["finetune", recipe.trainer.type]
    if recipe.adapter is not None:
        tags.append("qlora" if recipe.model.quantize else "lora")
    meta["tags"] = tags
    meta["pipeline_tag"] = _PIPELINE_TAG.get(recipe.trainer.type, "text-generation")
    return meta


def _base_license(base: str) -> str | None:
    """The base model's license from its own card: a local dir's README.md, or the Hub cache (no download)."""
    card = Path(base).expanduser() / "README.md"
    if not card.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
        except Exception:  # noqa: BLE001 - not a repo id, no cache: the license is simply unknown
            cached = None
        if not isinstance(cached, str):
            return None
        card = Path(cached)
    match = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8", errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _summary(recipe: Recipe) -> str:
    base = recipe.model.name or "a model built from model.init_config"
    how = "a LoRA adapter" if recipe.adapter is not None else "full weights"
    if recipe.adapter is not None and recipe.model.quantize:
        how = f"a QLoRA adapter ({recipe.model.quantize} base)"
    data = ", ".join(s.path for s in recipe.data.train)
    return (f"Trained from `{base}` with finetune {__version__} (trainer `{recipe.trainer.type}`, {how}) on "
            f"{data}. Rerun with `finetune run recipe.yaml` using the recipe below.")


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash: the card shows the rest
    return records


def _results(records: list[dict]) -> list[str]:
    if not records:
        return ["No metrics were logged."]
    last: dict = {}
    for r in records:
        last.update({k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    lines = ["Final values (the last logged value of each metric):", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in last.items() if k not in ("epoch", "time")]
    evals = [r for r in records if any(str(k).startswith("eval") for k in r)]
    if evals:
        keys = [k for k in dict.fromkeys(k for r in evals for k in r) if k == "step" or str(k).startswith("eval")]
        lines += ["", "Evaluation:", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in evals]
    return lines


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _versions() -> list[str]:
    import importlib.metadata as md

    lines = [f"- finetune {__version__}"]
    for name in ("transformers", "peft", "torch", "accelerate"):
        try:
            lines.append(f"- {name} {md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return lines
