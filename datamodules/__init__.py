"""LightningDataModules: local text, synthetic corpora, federated clients, tasks, questions."""

import strategies.process_group_exit  # noqa: F401  (each rank destroys its process group at exit)
