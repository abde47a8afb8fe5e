"""``kvstore bench``: kvstore's backends against raw S3 clients on one endpoint, beside the machine's limits.

``contenders`` (the clients), ``runner`` (rounds and measurements), ``limits`` (loopback TCP and
memcpy), ``null_endpoint`` (an S3 endpoint that stores nothing) and ``report`` (tables, targets, plot).
"""
