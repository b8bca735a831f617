"""BSSCI: the mioty Base Station - Service Center Interface (framing, messages, sessions)."""
