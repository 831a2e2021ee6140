"""User-space helpers compiled from native/*.c by `make` (the trace tools' batch formatter)."""
