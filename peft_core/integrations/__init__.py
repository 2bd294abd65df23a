"""Adapters for other libraries' training loops; each module imports its library only when used."""
