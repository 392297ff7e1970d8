"""Pictures and reports of what leaked."""
