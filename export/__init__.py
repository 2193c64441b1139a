"""Installed and imported only as ``fedge.export`` (see ARCHITECTURE.md, "Layout and namespace")."""

if __name__ != "fedge.export":  # this folder reached through sys.path instead of the installed package
    raise ImportError(f"import this package as fedge.export, not as {__name__!r}")
