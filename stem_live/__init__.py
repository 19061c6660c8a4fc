"""stem-live: in-line acquisition plugin for scanning transmission electron microscopes.

Import the parts you need (``stem_live.protocol``, ``stem_live.engine``, ...); this package
imports nothing heavy on its own.
"""

__version__ = "0.1.0"
