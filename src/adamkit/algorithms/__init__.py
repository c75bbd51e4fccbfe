"""One file per algorithm family: hyperparameters, state slots, per-step scalars, per-element rule."""
