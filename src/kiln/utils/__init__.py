"""Small shared helpers: errors, registries, typed environment flags, logging."""
