"""Blob to tree: the confined extractor children, inflate, the tar reader, member application."""
