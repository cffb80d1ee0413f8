"""On-disk formats shared between stages (each module: a pydantic schema, a writer and a reader)."""
