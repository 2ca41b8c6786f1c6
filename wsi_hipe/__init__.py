"""wsi-hipe."""
