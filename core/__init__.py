"""Layer 1, the base: errors, atomic file writes and path checks, record readers, safe checkpoint reading and
padding helpers. Imports no project package."""
