"""The transport-agnostic core: accounts, keys, messaging and live delivery."""
