"""Sampling and scoring: rollouts, rewards and verifiers, selection, rounds, PPO's policy/critic/reference."""
