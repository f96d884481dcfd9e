"""Reading weights into a built model: `safetensors_loader` (a checkpoint, this rank's share
only), `dummy` (random weights of the real shapes), `slicing` (a rank's slice of a tensor)."""

# --load-format: every family's loading takes one of these.
LOAD_FORMATS = ("safetensors", "dummy")
