"""Data: VTAB-1k and FGVC readers, preparation, and the sharded batch pipeline."""
