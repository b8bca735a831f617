"""Device-family protocols: one module or package per family (ingress, codecs, state machines)."""
