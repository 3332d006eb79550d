"""Custom Lightning strategies and FSDP helpers."""
