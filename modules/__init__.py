"""LightningModules, one file per method, plus the shared causal-LM module."""

import strategies.process_group_exit  # noqa: F401  (each rank destroys its process group at exit)
