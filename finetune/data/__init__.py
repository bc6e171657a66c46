"""The data's first stages: sources (local, Hub) -> row formats -> chat template + masks -> tokens."""
