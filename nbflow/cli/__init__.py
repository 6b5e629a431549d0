"""The `nbflow` command line."""
