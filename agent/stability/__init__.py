"""Stability AI: podq's access to its REST API, and an offline emulator of that API for tests and dry runs."""
