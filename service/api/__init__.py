"""HTTP: routes (one module per resource), their dependencies and the per-stepper serving state."""
