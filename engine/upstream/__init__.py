"""Upstream engines: models served by remote OpenAI-compatible replicas (llama-server, vLLM, Ollama,
another PocketLLM gateway). The only package that imports an HTTP client to upstreams.

``config`` (settings), ``replicas`` (choice, stickiness, ejection), ``sse`` (the upstream's stream),
``model`` (``UpstreamModel``: requests, retries, health checks), ``errors``.
"""
