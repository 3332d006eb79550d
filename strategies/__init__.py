"""Custom Lightning strategies, registered by name on import (``cli.py`` imports this package)."""

from strategies import (
    client_parallel,  # noqa: F401  (registers "client_parallel")
    fsdp,  # noqa: F401  (registers "fsdp_hf")
)
