"""Experiments with lfp_jax: demos, training runs and studies (run from the repository root)."""
