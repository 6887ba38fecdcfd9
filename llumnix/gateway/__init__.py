"""The OpenAI-compatible gateway: every request placed by the Llumnix scheduler on the live
load its instances' llumlets report, forwarded and streamed back (:class:`Gateway`)."""

from llumnix.gateway.server import Gateway, GatewayConfig, build_app, serve, serve_in_thread

__all__ = ["Gateway", "GatewayConfig", "build_app", "serve", "serve_in_thread"]
