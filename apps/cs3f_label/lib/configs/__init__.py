"""Task configs of the app, one module each; selected with ``--conf models <name>`` (default: all)."""
