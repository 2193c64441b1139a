"""The hub's read-only fleet dashboard and Prometheus ``/metrics`` (``fedge hub serve --http HOST:PORT``).

``listen`` (address parsing, loopback check; imported by the config), ``snapshot`` (read-only queries of the
store), ``metrics`` (the Prometheus collector), ``server`` (the HTTP server thread), ``static/`` (page, script,
style: no CDN, works offline). Nothing here writes the store.
"""
