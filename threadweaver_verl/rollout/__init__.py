"""Fork/join rollout: the engine interface, the controller (the one state machine),
the OpenAI-compatible engine adapter and the verl agent-loop adapter."""
