"""lit_meta."""
