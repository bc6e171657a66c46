"""Command-line interface: argument parsing and dispatch only (entry point: finetune.cli.main:main)."""
