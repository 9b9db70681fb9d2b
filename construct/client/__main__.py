"""`python -m construct.client` is `construct-chat`."""

from construct.client.cli import main

main()
