"""Tool agents' engines: pure, typed, testable without the graph or the UI.

Nothing in this package imports from ``agents`` or ``ui``.
"""
