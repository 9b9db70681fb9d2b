"""The web client, served by the server itself (docs/webclient.md).

`static/` holds the page, its JavaScript modules and the vendored libsodium. They are read into
memory once, when the site is built, and served from there: no file I/O on the reactor thread, no
directory listings, and every response carries the page's security headers.
"""
