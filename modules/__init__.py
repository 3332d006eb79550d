"""LightningModules, one file per method, plus the shared causal-LM module."""
