"""The typed recipe: schema, YAML loading with line numbers, dotted overrides, validation. Imports no torch."""
