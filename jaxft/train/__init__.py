"""Training: objectives and their losses (chunked cross-entropy, per-token log-probs), and the pieces a recipe wires
into a jitted step."""
