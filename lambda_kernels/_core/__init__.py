"""Internal helpers shared by every op: input validation, runtime dispatch, normalisers."""
