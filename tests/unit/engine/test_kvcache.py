"""The host KV cache's default bound (no model needed)."""

from engine.config import ModelSettings
from engine.kvcache import LLAMA_SERVER_CACHE_RAM_MIB, default_pool_mib


def test_the_default_bound_is_llama_servers_capped_at_a_quarter_of_ram() -> None:
    assert default_pool_mib(total_mib=64 * 1024) == LLAMA_SERVER_CACHE_RAM_MIB == 8192
    assert default_pool_mib(total_mib=24 * 1024) == 6 * 1024
    assert default_pool_mib(total_mib=2 * 1024) == 512
    assert default_pool_mib(total_mib=0) == 0


def test_a_model_takes_the_default_unless_configured() -> None:
    assert ModelSettings(id="m").kv_cache_mib == default_pool_mib()
    assert ModelSettings(id="m", kv_cache_mib=0).kv_cache_mib == 0
