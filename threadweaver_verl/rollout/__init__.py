"""Fork/join rollout: the engine interface (``engine``), the controller (the one state machine,
``controller``), the OpenAI-compatible engine adapter (``openai_engine``) over its HTTP client
(``http``), and the vLLM server launcher (``vllm_server``). verl's agent loop is the other engine
adapter: :mod:`threadweaver_verl.integrations.verl.agent_loop`."""
