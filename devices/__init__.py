"""Installed and imported only as ``fedge.devices`` (see ARCHITECTURE.md, "Layout and namespace")."""

if __name__ != "fedge.devices":  # this folder reached through sys.path instead of the installed package
    raise ImportError(f"import this package as fedge.devices, not as {__name__!r}")
