"""Re-id evaluation and image-quality measurement."""
