"""The `elastiformer` command line: `commands.py` (the commands of ElastiFormer, the entry point and exit codes),
`flextron.py` (`elastiformer flextron ...`), `options.py` (command line over YAML over defaults)."""

from .commands import app, main

__all__ = ["app", "main"]
