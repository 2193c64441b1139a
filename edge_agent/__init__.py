"""Installed and imported only as ``fedge.edge_agent`` (see ARCHITECTURE.md, "Layout and namespace")."""

if __name__ != "fedge.edge_agent":  # this folder reached through sys.path instead of the installed package
    raise ImportError(f"import this package as fedge.edge_agent, not as {__name__!r}")
