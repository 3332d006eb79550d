"""LightningDataModules: local text, synthetic corpora, federated clients, tasks, questions."""
