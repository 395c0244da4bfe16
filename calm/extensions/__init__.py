"""What we add beyond the paper, each option named and documented as ours (off by default)."""
