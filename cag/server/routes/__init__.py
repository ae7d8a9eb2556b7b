"""The server's routes, as named handlers grouped by what they serve: health and metrics, OpenAI's API,
knowledge-base management, and Ollama's API (its bodies and wording in cag.server.ollama). Each reaches the
shared state through cag.server.state, and every route that answers goes through the one completion path
(cag.server.completion).
"""
