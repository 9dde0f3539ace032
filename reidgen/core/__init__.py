"""What every reidgen package builds on and that needs no torch: settings (environment variables)."""
