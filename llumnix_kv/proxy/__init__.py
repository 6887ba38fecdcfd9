"""HTTP front ends for disaggregated serving.

:mod:`llumnix_kv.proxy.pd_proxy` is an OpenAI-compatible prefill-decode proxy: it runs each
request's prompt on a prefill instance (``max_tokens=1``) and the request itself on a decode
instance that reads the prefill's KV cache through the KV connector. It needs ``aiohttp``
(installed with vLLM).
"""
