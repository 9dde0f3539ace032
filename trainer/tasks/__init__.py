"""What each training command optimises, on the one loop."""
