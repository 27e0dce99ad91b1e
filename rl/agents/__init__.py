"""Agents as ``init`` / ``act`` / ``update`` functions over state NamedTuples."""
