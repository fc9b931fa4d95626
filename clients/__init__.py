"""Clients podq runs on hosts (each file also works on its own there, as a script)."""
