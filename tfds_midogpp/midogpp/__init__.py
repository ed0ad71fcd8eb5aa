"""The `midogpp` dataset."""
