"""DurableCache: move live ElastiCache (Valkey / Redis OSS) data onto durable clusters."""

__version__ = "0.1.0"
