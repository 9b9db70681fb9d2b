"""Reference client for Construct."""
