"""Stage entry points: each one a Hydra app, config in, artifacts out."""
