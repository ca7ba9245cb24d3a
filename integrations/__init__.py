"""Framework integrations, installed as ``safefreeze.integrations``.

Each submodule imports its framework when imported; the core never imports this package.
"""
