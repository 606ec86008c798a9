"""Storage: sources listed, feature and result tables, committed outputs, progress."""
