"""Production mode's Redis backend: the inbox, presence, and pub/sub wake-ups."""
