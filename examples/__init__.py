"""Example Apps, each audited in CI with ``assured audit --app`` (see each folder's README)."""
