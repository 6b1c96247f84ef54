"""Operations: the `alluse` command (ops.cli), its HTTP client and `alluse doctor`."""
