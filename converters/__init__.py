"""Framework bridges, imported as ``nnbridge.converters.torch`` / ``nnbridge.converters.mlx``."""
