"""Engine plugins: the only place where engine packages are imported.

Each subpackage adapts one engine's hooks to :mod:`llumnix_kv.connector` and is imported only
by that engine (for example through vLLM's ``kv_connector_module_path``), never by
``import llumnix_kv``.
"""
