"""Training: losses (chunked cross-entropy), and the pieces a recipe wires into a jitted step."""
