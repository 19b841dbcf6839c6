"""Local stand-ins for Google platform pieces (identity, TLS CA), for tests and the local mesh."""
