"""The server's routes, as named handlers grouped by what they serve: health and metrics, OpenAI's API, and
knowledge-base management (Ollama's API is cag.server.ollama). Each reaches the shared state through
cag.server.state, and every route that answers goes through the one completion path (cag.server.completion).
"""
