"""Custom Lightning strategies, registered by name on import (``cli.py`` imports this package),
and the exit handler that destroys a rank's process group before the interpreter finalizes."""

from strategies import (
    client_parallel,  # noqa: F401  (registers "client_parallel")
    fsdp,  # noqa: F401  (registers "fsdp_hf")
    process_group_exit,  # noqa: F401  (registers the atexit teardown)
    spawn_results,  # noqa: F401  (re-registers "ddp_spawn", "ddp_fork", "ddp_notebook", ...)
)
