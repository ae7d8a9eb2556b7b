"""cag's HTTP service: an OpenAI-compatible server over knowledge bases in CAG_HOME (`cag serve`)."""

from .app import create_app
from .config import ServerConfig, load_config, with_flags
from .middleware import configure_logging

__all__ = ["create_app", "ServerConfig", "load_config", "with_flags", "configure_logging"]
