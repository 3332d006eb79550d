"""Lightning callbacks (metrics file, export, diagnostics, influence, ...)."""
