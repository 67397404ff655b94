"""How an upstream model is reached: its replicas, the name it is known by there, its key and timeouts."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

Seconds = Annotated[float, Meta(gt=0)]


class UpstreamSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """A model served by remote OpenAI-compatible replicas (llama-server, vLLM, another gateway).

    ```toml
    [[models]]
    id = "remote-smol"
    [models.upstream]
    urls = ["http://10.200.1.2:8080/v1", "http://10.200.2.2:8080/v1"]
    model = "smollm2"
    api_key_env = "UPSTREAM_KEY"
    ```
    """

    urls: Annotated[list[Annotated[str, Meta(pattern=r"^https?://[^\s]+$")]], Meta(min_length=1)]
    """Base URLs including ``/v1``, one per replica of the same model."""
    model: str | None = None
    """The model's name on the upstream; default: this model's id."""
    api_key_env: str | None = None
    """Environment variable holding the upstream's bearer key (the key itself never goes in a file)."""
    connect_timeout_s: Seconds = 2.0
    first_byte_timeout_s: Seconds = 60.0
    """From sending the request to the upstream's response headers (and its first stream chunk)."""
    idle_timeout_s: Seconds = 30.0
    """The longest gap between two stream chunks before the stream is given up."""
    max_concurrency: Annotated[int, Meta(ge=0)] = 0
    """Requests in flight per replica; 0: unlimited."""
    health_interval_s: Seconds = 2.0
    """How often ejected replicas are probed for re-admission, and healthy ones where a request has waited
    this long for its first byte (a failed probe ejects; healthy replicas are probed every 5 intervals)."""
