"""HTTP: the OpenAI-compatible routers, error rendering and the app factory."""
