"""Ray actors (client workers, server), the serial backend, and the orchestrator."""
