"""Installed and imported only as ``fedge.hub`` (see ARCHITECTURE.md, "Layout and namespace")."""

if __name__ != "fedge.hub":  # this folder reached through sys.path instead of the installed package
    raise ImportError(f"import this package as fedge.hub, not as {__name__!r}")
