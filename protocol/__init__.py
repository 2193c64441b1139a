"""Installed and imported only as ``fedge.protocol`` (see ARCHITECTURE.md, "Layout and namespace")."""

if __name__ != "fedge.protocol":  # this folder reached through sys.path instead of the installed package
    raise ImportError(f"import this package as fedge.protocol, not as {__name__!r}")
