"""Shared fixtures of the agent tests.

``artifacts_dir``: ``$FEDGE_ARTIFACTS`` when set (CI's agent-only venv: no TensorFlow there),
else a small cnn28 export made once per session with ``export.testing.export_small``.
Marker ``full_env`` (declared in pyproject.toml): tests that only hold in the full venv (deselected in the
agent venv).
"""
