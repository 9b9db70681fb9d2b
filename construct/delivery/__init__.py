"""Delivery backends: the inbox records and the event bus that wakes connection holders."""
