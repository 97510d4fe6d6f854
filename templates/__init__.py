"""Jinja2 templates of the generated code, shipped as package data (``nnbridge.templates``)."""
