"""Command-line interface: argument parsing only; the work lives in the modules it calls.

Exit codes: 0 success; 2 recipe/usage/data errors (one line on stderr, no traceback);
1 anything else (the cause in one line first, then the traceback for the bug report).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from finetune import __version__
from finetune.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="LLM fine-tuning from YAML recipes.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train a recipe in this process (resumes from the newest checkpoint)")
    _recipe_args(p)
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the plan, train nothing")

    p = sub.add_parser("validate", help="check a recipe without importing torch or loading weights")
    _recipe_args(p)

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
    from finetune.recipe import check_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    notes = check_recipe(recipe)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{args.recipe}: ok ({recipe.trainer.type}, output {recipe.run.output_dir})")
    return 0


def cmd_run(args) -> int:
    from finetune.launch import run_recipe
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_recipe(recipe, dry_run=args.dry_run)
    return 0


def cmd_data(args) -> int:
    from transformers.utils import logging as hf_logging

    from finetune.audit import audit
    from finetune.recipe import check_recipe, load_recipe

    hf_logging.disable_progress_bar()
    recipe = load_recipe(args.recipe, args.overrides)
    check_recipe(recipe)
    show = args.samples if args.samples is not None else (-1 if args.json else 3)
    return audit(recipe, as_json=args.json, show=show)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Flags may come before or after key=value overrides (`run r.yaml --dry-run optim.lr=1`):
    # argparse leaves overrides after a flag unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
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
