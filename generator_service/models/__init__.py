"""The networks, each model kind owning its loading."""
