"""Command-line interface: argument parsing only; the work lives in the modules it calls.

Exit codes: 0 success; 2 recipe/usage/data errors (one line on stderr, no traceback);
1 anything else (the cause in one line first, then the traceback for the bug report).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from finetune import __version__
from finetune.errors import UserError


class UsageError(UserError):
    """Wrong command-line usage (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="LLM fine-tuning from YAML recipes.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train a recipe in this process (resumes from the newest checkpoint)")
    _recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the plan, train nothing")

    p = sub.add_parser("validate", help="check a recipe without importing torch or loading weights")
    _recipe_args(p)

    p = sub.add_parser("launch", help="run a recipe in N processes (x M nodes) through accelerate launch")
    _recipe_args(p)
    p.add_argument("--num-processes", type=int, help="processes per node (CPU processes with gloo without GPUs)")
    p.add_argument("--gpus", type=int, help="alias of --num-processes that also checks the visible GPUs")
    p.add_argument("--nnodes", type=int, help="number of nodes (machines)")
    p.add_argument("--node-rank", type=int, help="this node's rank, 0..nnodes-1 (default: $SLURM_NODEID or $NODE_RANK)")
    p.add_argument("--master", help="host:port of node 0 (rendezvous)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "zero2", "zero3"])

    p = sub.add_parser("env", help="versions, devices and what each launch strategy needs")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "zero2", "zero3"])

    from finetune.infer import eval_cli, generate_cli, plot
    from finetune.models.merge import add_merge_arguments
    from finetune.train import bench

    add_merge_arguments(sub.add_parser("merge", help="fold a LoRA adapter into its base model, verified"))
    generate_cli.add_generate_arguments(sub.add_parser("generate", help="complete prompts (model, adapter or run)"))
    generate_cli.add_chat_arguments(sub.add_parser("chat", help="chat with a model in the terminal (streams tokens)"))
    eval_cli.add_eval_arguments(sub.add_parser("eval", help="exact match / pass@k, perplexity or mean reward"))
    plot.add_plot_arguments(sub.add_parser("plot", help="PNG curves of one or more runs' metrics.jsonl"))
    bench.add_bench_arguments(sub.add_parser("bench", help="tokens/s, memory, MFU of our SFT path vs TRL's (GPU)"))

    p = sub.add_parser("data", help="audit a recipe's data: token counts, masks (trained tokens highlighted)")
    _recipe_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per sample: input_ids, labels_mask, tokens")
    p.add_argument("--samples", type=int, default=None,
                   help="samples to render (default 3; with --json: all)")
    return parser


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="path to a recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4")


def cmd_validate(args) -> int:
    from finetune.recipe.checks import check_recipe
    from finetune.recipe.schema import PeerConfigError, load_recipe
    from finetune.run.pipeline import is_pipeline, load_pipeline

    if is_pipeline(args.recipe):
        _, stages = load_pipeline(args.recipe, args.overrides)
        print(f"{args.recipe}: ok (pipeline of {len(stages)} stages)")
        return 0
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except PeerConfigError as e:
        return print_translation(e)
    notes = check_recipe(recipe)
    if recipe.model.quantize:  # needs torch/bitsandbytes: only imported when quantization is asked for
        from finetune.models.loading import check_quantization_supported

        notes += check_quantization_supported(recipe)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{args.recipe}: ok ({recipe.trainer.type}, output {recipe.run.output_dir})")
    return 0


def print_translation(e) -> int:
    """An Axolotl / TRL config given to validate: the equivalent recipe on stdout (save it and
    check it), what has no equivalent on stderr; exit 2 because the file itself does not run."""
    import yaml

    from finetune.recipe.peers import translate_config

    recipe, unmapped = translate_config(e.data, e.path.stem)
    print(f"# finetune recipe equivalent to {e.path} ({e.kind} config)")
    print(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False), end="")
    if unmapped:
        print(f"finetune: note: no equivalent for: {', '.join(unmapped)}", file=sys.stderr)
    print(f"finetune: error: {e.path} is an {e.kind} config, not a recipe: the equivalent recipe is above "
          f"(save it, e.g. `finetune validate {e.path} > recipe.yaml`, and check it)", file=sys.stderr)
    return 2


def peer_flag_hints(stray: list[str]) -> list[str]:
    """`--learning_rate 1e-4` -> 'unknown flag --learning_rate (did you mean optim.lr=1e-4?)'."""
    import yaml

    from finetune.recipe.peers import suggestion

    hints = []
    for i, arg in enumerate(stray):
        if not arg.startswith("--"):
            continue
        name, eq, raw = arg[2:].partition("=")
        if not eq:
            following = stray[i + 1] if i + 1 < len(stray) else None
            raw = following if following is not None and not following.startswith("-") else "true"
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        hint = suggestion(name, value)
        if hint:
            hints.append(f"unknown flag --{name}{hint}; recipe keys are set as key=value")
    return hints


def cmd_run(args) -> int:
    from finetune.recipe.schema import load_recipe
    from finetune.run.launch import end_process_group, run_recipe
    from finetune.run.pipeline import is_pipeline, run_pipeline
    from finetune.train.guards import Preempted

    try:
        if is_pipeline(args.recipe):
            run_pipeline(args.recipe, args.overrides, dry_run=args.dry_run)
        else:
            run_recipe(load_recipe(args.recipe, args.overrides), dry_run=args.dry_run)
    except Preempted as e:  # every rank stopped at the same step and wrote its checkpoint: all meet here
        traceback.clear_frames(e.__traceback__)  # the frames hold the model, whose FSDP state holds the group
        end_process_group()  # its barrier also keeps rank 0 alive until the others are done: exit 75, not an abort
        raise
    end_process_group()
    return 0


def cmd_data(args) -> int:
    from transformers.utils import logging as hf_logging

    from finetune.recipe.checks import check_recipe
    from finetune.recipe.schema import load_recipe
    from finetune.run.audit import audit

    hf_logging.disable_progress_bar()
    recipe = load_recipe(args.recipe, args.overrides)
    check_recipe(recipe)
    show = args.samples if args.samples is not None else (-1 if args.json else 3)
    return audit(recipe, as_json=args.json, show=show)


def cmd_launch(args) -> int:
    from finetune.recipe.schema import load_recipe
    from finetune.run.launch import launch_processes

    if args.gpus is not None and args.num_processes is not None:
        raise UsageError("give either --gpus or --num-processes")
    node_rank = args.node_rank
    if node_rank is None and args.nnodes and args.nnodes > 1:
        # Under SLURM (srun) or a launcher that exports NODE_RANK, each node knows its own rank.
        var = next((v for v in ("SLURM_NODEID", "NODE_RANK") if os.environ.get(v)), None)
        if var is not None:
            # A rank read wrongly would make two nodes claim the same rank and hang the rendezvous.
            if not os.environ[var].isdigit():
                raise UsageError(f"${var}={os.environ[var]!r} is not a node rank (0..nnodes-1); "
                                 "give --node-rank")
            node_rank = int(os.environ[var])
    flags = {"num_processes": args.gpus if args.gpus is not None else args.num_processes,
             "nnodes": args.nnodes, "node_rank": node_rank, "master": args.master, "strategy": args.strategy}
    overrides = list(args.overrides) + [f"launch.{k}={v}" for k, v in flags.items() if v is not None]
    recipe = load_recipe(args.recipe, overrides)
    return launch_processes(args.recipe, overrides, recipe, gpus_requested=args.gpus is not None)


def cmd_merge(args) -> int:
    from finetune.models.merge import cmd_merge as merge

    return merge(args)


def cmd_env(args) -> int:
    from finetune.run.doctor import report

    print("\n".join(report(args.strategy)))
    return 0


def _lazy(module: str, name: str):
    def call(args) -> int:
        import importlib

        return getattr(importlib.import_module(module), name)(args)
    return call


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "data": cmd_data, "launch": cmd_launch, "env": cmd_env,
            "merge": cmd_merge, "generate": _lazy("finetune.infer.generate_cli", "cmd_generate"),
            "chat": _lazy("finetune.infer.generate_cli", "cmd_chat"),
            "eval": _lazy("finetune.infer.eval_cli", "cmd_eval"),
            "plot": _lazy("finetune.infer.plot", "cmd_plot"), "bench": _lazy("finetune.train.bench", "cmd_bench")}


def quiet_libraries() -> None:
    """Our progress output is the one to read: hide the Hub/transformers bars and a deprecation
    warning that peft triggers inside transformers on every adapter load."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    # Flags may come before or after key=value overrides (`run r.yaml --dry-run optim.lr=1`):
    # argparse leaves overrides after a flag unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        hints = peer_flag_hints(stray)
        parser.error(hints[0] if hints else f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the contract: cause in one line first, then details
        print(f"finetune: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
