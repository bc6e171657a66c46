"""The quickstart's synthetic data generators and the task's verifier (not part of the library core)."""
