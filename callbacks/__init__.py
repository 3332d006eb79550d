"""Lightning callbacks (metrics file, export, diagnostics, influence, ...)."""

import strategies.process_group_exit  # noqa: F401  (each rank destroys its process group at exit)
