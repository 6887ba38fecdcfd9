"""vLLM plugin: :class:`LlumnixConnector`, an out-of-tree KV connector for vLLM 0.32.

Load it with::

    kv_transfer_config={
        "kv_connector": "LlumnixConnector",
        "kv_connector_module_path": "llumnix_kv.plugins.vllm",
        "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
        "kv_connector_extra_config": {...},  # see LlumnixConnectorConfig
    }
"""

from __future__ import annotations

from llumnix_kv.plugins.vllm.config import LlumnixConnectorConfig
from llumnix_kv.plugins.vllm.connector import (
    LlumnixConnector,
    LlumnixConnectorMetadata,
    LlumnixHandshake,
)

__all__ = [
    "LlumnixConnector",
    "LlumnixConnectorConfig",
    "LlumnixConnectorMetadata",
    "LlumnixHandshake",
]
