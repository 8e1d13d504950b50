"""Models: the tiny Qwen3-style model of the tests and the demo (``tiny``), and the format tags
added to any HF tokenizer and model (``tags``)."""
