"""torch.optim optimizers, learning-rate schedules and subproblem solvers."""
